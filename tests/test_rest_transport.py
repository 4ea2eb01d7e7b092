"""The OPA REST client over its aiohttp transport, against real aiohttp servers on loopback.

Each failure of the transport must reach the decider as the same PolicyError kind httpx's own
transport gave (timeout, unreachable, error), so every one of them still fails closed.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from harness import free_port, serve_app
from sidecar.policy.engine import PolicyError
from sidecar.policy.rest import RestEngine

DECISION_PATH = "sidecar/authz/decision"
INPUT = {"request": {"method": "GET", "path": "/crm/customers/1"}, "task": {"id": "t-1"}}


class FakeOpa:
    """Answers POST /v1/data/... as the test tells it; records what it saw."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.peers: set[Any] = set()
        self.answer: web.StreamResponse | None = None
        self.hold = asyncio.Event()
        self.held = False

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        self.requests.append({"method": request.method, "path": request.path, "headers": dict(request.headers),
                              "body": await request.read()})
        if self.held:
            await self.hold.wait()
        return self.answer or web.json_response({"result": {"allow": True}})


@pytest.fixture
async def opa() -> AsyncIterator[tuple[FakeOpa, str]]:
    fake = FakeOpa()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner, port = await serve_app(app)
    yield fake, f"http://127.0.0.1:{port}"
    fake.hold.set()
    await runner.cleanup()


async def ask(url: str, timeout_seconds: float = 5) -> Any:
    """One decision query through a fresh client, closed afterwards."""
    engine = RestEngine(url, timeout_seconds=timeout_seconds)
    try:
        return await engine.evaluate(DECISION_PATH, INPUT)
    finally:
        await engine.close()


async def failure(url: str, timeout_seconds: float = 5) -> PolicyError:
    with pytest.raises(PolicyError) as raised:
        await ask(url, timeout_seconds)
    return raised.value


async def test_the_query_is_opas_data_api_shape_and_the_result_comes_back(opa: tuple[FakeOpa, str]) -> None:
    fake, url = opa
    assert await ask(url) == {"allow": True}
    [seen] = fake.requests
    assert seen["method"] == "POST" and seen["path"] == "/v1/data/sidecar/authz/decision"
    assert seen["headers"]["Content-Type"] == "application/json"
    assert json.loads(seen["body"]) == {"input": INPUT}


async def test_connections_to_opa_are_reused(opa: tuple[FakeOpa, str]) -> None:
    fake, url = opa
    engine = RestEngine(url, timeout_seconds=5)
    try:
        for _ in range(5):
            await engine.evaluate(DECISION_PATH, INPUT)
    finally:
        await engine.close()
    assert len(fake.requests) == 5 and len(fake.peers) == 1


async def test_a_compressed_answer_is_decoded(opa: tuple[FakeOpa, str]) -> None:
    fake, url = opa
    fake.answer = web.Response(body=gzip.compress(json.dumps({"result": {"allow": False}}).encode()),
                               headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert await ask(url) == {"allow": False}


async def test_an_answer_slower_than_the_timeout_is_a_timeout(opa: tuple[FakeOpa, str]) -> None:
    fake, url = opa
    fake.held = True  # the server never answers until the test ends
    assert (await failure(url, timeout_seconds=0.2)).kind == "timeout"


async def test_nothing_listening_is_unreachable() -> None:
    engine = RestEngine(f"http://127.0.0.1:{free_port()}", timeout_seconds=5)
    try:
        with pytest.raises(PolicyError) as raised:
            await engine.evaluate(DECISION_PATH, INPUT)
        assert await engine.health() is False
    finally:
        await engine.close()
    assert raised.value.kind == "unreachable"


async def test_a_connection_closed_without_an_answer_is_unreachable() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        failed = await failure(f"http://127.0.0.1:{port}")
    finally:
        server.close()
        await server.wait_closed()
    assert failed.kind == "unreachable"


async def test_an_opa_error_answer_is_an_engine_error(opa: tuple[FakeOpa, str]) -> None:
    fake, url = opa
    fake.answer = web.json_response({"code": "internal_error", "message": "eval_conflict_error"}, status=500)
    failed = await failure(url)
    assert failed.kind == "error" and "internal_error" in failed.message


async def test_proxy_variables_in_the_environment_do_not_reroute_policy_queries(
        opa: tuple[FakeOpa, str], monkeypatch: pytest.MonkeyPatch) -> None:
    fake, url = opa
    dead = f"http://127.0.0.1:{free_port()}"
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, dead)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert await ask(url) == {"allow": True}
    assert len(fake.requests) == 1
