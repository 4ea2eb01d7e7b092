"""Every bad input is refused with a machine-readable problem, and the upstream sees nothing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from harness import EchoTool, RunningSidecar, free_port, serve_app


async def raw_request(port: int, data: bytes) -> tuple[int, bytes, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    body = await reader.readexactly(length)
    writer.close()
    return int(head.split()[1]), head, body


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem: dict[str, Any] = response.json()
    assert problem["code"] == code and problem["status"] == status
    assert problem["type"].endswith("/" + code) and problem["title"] and isinstance(problem["reasons"], list)
    return problem


async def test_body_over_the_limit_with_content_length(make_sidecar: Any, echo_tool: EchoTool) -> None:
    sc: RunningSidecar = await make_sidecar(limits={"max_body_bytes": 1024})
    async with httpx.AsyncClient() as agent:
        response = await agent.put(f"{sc.proxy}/crm/notes/1", content=b"x" * 1025)
    problem = assert_problem(response, 413, "body_too_large")
    assert problem["limit_bytes"] == 1024
    assert echo_tool.seen == []


async def test_chunked_body_over_the_limit(make_sidecar: Any, echo_tool: EchoTool) -> None:
    sc: RunningSidecar = await make_sidecar(limits={"max_body_bytes": 1024})

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b"y" * 512

    async with httpx.AsyncClient() as agent:
        response = await agent.put(f"{sc.proxy}/crm/notes/1", content=chunks())
    assert_problem(response, 413, "body_too_large")
    assert echo_tool.seen == []


async def test_body_at_the_limit_passes(make_sidecar: Any, echo_tool: EchoTool) -> None:
    sc: RunningSidecar = await make_sidecar(limits={"max_body_bytes": 1024})
    async with httpx.AsyncClient() as agent:
        task = (await agent.post(f"{sc.admin}/v1/tasks", json={"intent": "notes"})).json()["id"]
        response = await agent.put(f"{sc.proxy}/crm/notes/1", content=b"z" * 1024, headers={"X-Agent-Task": task})
    assert response.status_code == 200
    assert echo_tool.seen[0].body == b"z" * 1024


@pytest.mark.parametrize("body", [b"{not json", b'{"a": 1', b"[" * 100000])
async def test_malformed_json(sidecar: RunningSidecar, echo_tool: EchoTool, body: bytes) -> None:
    async with httpx.AsyncClient() as agent:
        response = await agent.post(f"{sidecar.proxy}/crm/customers", content=body,
                                    headers={"Content-Type": "application/json"})
    problem = assert_problem(response, 400, "bad_request")
    assert "malformed JSON" in problem["detail"]
    assert echo_tool.seen == []


@pytest.mark.parametrize("headers, detail", [
    ([("Authorization", "Bearer a"), ("Authorization", "Bearer b")], "authorization sent more than once"),
    ([("X-Api-Key", "a"), ("X-Api-Key", "b")], "x-api-key sent more than once"),
    ([("X-Agent-Decision", "forged")], "x-agent-decision is set by the sidecar only"),
    ([("X-Agent-Task", "t-1"), ("X-Agent-Task", "t-2")], "X-Agent-Task sent more than once"),
    ([("X-Agent-Approval", "ap-1"), ("X-Agent-Approval", "ap-2")], "X-Agent-Approval sent more than once"),
])
async def test_spoofed_or_duplicated_credential_headers(sidecar: RunningSidecar, echo_tool: EchoTool,
                                                        headers: list[tuple[str, str]], detail: str) -> None:
    async with httpx.AsyncClient() as agent:
        response = await agent.get(f"{sidecar.proxy}/crm/customers/1", headers=headers)
    problem = assert_problem(response, 400, "credential_header")
    assert detail in problem["detail"]
    assert echo_tool.seen == []


@pytest.mark.parametrize("path", ["/crm/a%2Fb", "/crm/../payments/refunds", "/crm/%2e%2e/payments", "/crm//x", "/crm/a\\b"])
async def test_ambiguous_paths(sidecar: RunningSidecar, echo_tool: EchoTool, path: str) -> None:
    # Sent on a raw socket: HTTP clients normalise such paths before they leave.
    status, head, body = await raw_request(sidecar.sidecar.config.proxy.port,
                                           f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert status == 400 and b"application/problem+json" in head
    assert json.loads(body)["code"] == "bad_request"
    assert echo_tool.seen == []


async def test_unknown_task(sidecar: RunningSidecar, echo_tool: EchoTool) -> None:
    async with httpx.AsyncClient() as agent:
        response = await agent.get(f"{sidecar.proxy}/crm/customers/1", headers={"X-Agent-Task": "t-doesnotexist"})
    assert_problem(response, 400, "unknown_task")
    assert echo_tool.seen == []


async def test_hop_by_hop_headers_are_not_forwarded(sidecar: RunningSidecar, echo_tool: EchoTool) -> None:
    async with httpx.AsyncClient() as agent:
        response = await agent.get(f"{sidecar.proxy}/crm/customers/1", headers={
            "Connection": "keep-alive, X-Private-Hop", "X-Private-Hop": "1", "Keep-Alive": "timeout=5",
            "TE": "trailers", "Upgrade": "websocket", "Prefer": "wait=5", "X-Keep-Me": "yes"})
    assert response.status_code == 200
    [seen] = echo_tool.seen
    for name in ("x-private-hop", "keep-alive", "te", "upgrade", "prefer"):
        assert name not in seen.headers, name
    assert seen.headers["x-keep-me"] == ["yes"]


# ------------------------------------------------------------------ the policy engine misbehaves


@pytest.mark.parametrize("path, kind", [
    ("/crm/fault/malformed", "malformed"),
    ("/crm/fault/extra-field", "malformed"),
    ("/crm/fault/string", "malformed"),
    ("/crm/fault/conflict", "error"),
    ("/crm/fault/slow", "timeout"),
])
async def test_policy_faults_fail_closed(sidecar: RunningSidecar, echo_tool: EchoTool, path: str, kind: str) -> None:
    async with httpx.AsyncClient(timeout=30) as agent:
        response = await agent.get(f"{sidecar.proxy}{path}")
    problem = assert_problem(response, 503, "policy_unavailable")
    assert problem["policy_error"] == kind and problem["decision_id"]
    assert problem["reasons"]
    assert echo_tool.seen == []


async def test_undefined_decision_fails_closed(make_sidecar: Any, echo_tool: EchoTool) -> None:
    sc: RunningSidecar = await make_sidecar(policy={"engine": "embedded", "decision_path": "sidecar/authz/nothing_here",
                                                    "rego_dir": str(__import__("harness").FIXTURE_POLICY)})
    async with httpx.AsyncClient() as agent:
        response = await agent.get(f"{sc.proxy}/crm/customers/1")
    problem = assert_problem(response, 503, "policy_unavailable")
    assert problem["policy_error"] == "undefined"
    assert echo_tool.seen == []


async def test_unreachable_rest_engine_fails_closed(make_sidecar: Any, echo_tool: EchoTool) -> None:
    sc: RunningSidecar = await make_sidecar(engine="rest", rest_url=f"http://127.0.0.1:{free_port()}")
    async with httpx.AsyncClient() as agent:
        response = await agent.get(f"{sc.proxy}/crm/customers/1")
        ready = await agent.get(f"{sc.metrics}/readyz")
    problem = assert_problem(response, 503, "policy_unavailable")
    assert problem["policy_error"] == "unreachable"
    assert echo_tool.seen == []
    assert ready.status_code == 503 and ready.json()["failing"] == ["policy"]


async def test_a_runaway_evaluation_holds_one_engine_not_the_pool(make_sidecar: Any, echo_tool: EchoTool) -> None:
    """With two engines, a call whose evaluation overruns its deadline is refused, and the next call
    is decided by the other engine while the first is still busy."""
    sc: RunningSidecar = await make_sidecar(policy={"engine": "embedded", "rego_dir": str(__import__("harness").FIXTURE_POLICY),
                                                    "timeout_ms": 250, "embedded_workers": 2})
    async with httpx.AsyncClient(timeout=30) as agent:
        slow = await agent.get(f"{sc.proxy}/crm/fault/slow")
        normal = await agent.get(f"{sc.proxy}/crm/customers/1")
    assert slow.json()["policy_error"] == "timeout"
    assert normal.status_code == 200
    assert [s.path for s in echo_tool.seen] == ["/crm/customers/1"]


async def test_calls_past_the_in_flight_limit_are_refused_not_queued(make_sidecar: Any) -> None:
    """An upstream that holds every call until released; the limit is 2, the third call is refused at once."""
    from aiohttp import web

    release = asyncio.Event()
    arrived: list[str] = []

    async def hold(request: web.Request) -> web.Response:
        arrived.append(request.path)
        await release.wait()
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/{tail:.*}", hold)
    runner, port = await serve_app(app)
    try:
        sc: RunningSidecar = await make_sidecar(limits={"max_in_flight": 2}, routes=[
            {"name": "slowtool", "match": {"path_prefix": "/slow"}, "upstream": f"http://127.0.0.1:{port}"}])
        async with httpx.AsyncClient(timeout=30) as agent:
            held = [asyncio.create_task(agent.get(f"{sc.proxy}/slow/{i}")) for i in range(2)]
            while len(arrived) < 2:
                await asyncio.sleep(0.01)  # poll until both calls are at the upstream
            refused = await agent.get(f"{sc.proxy}/slow/third")
            release.set()
            answers = await asyncio.gather(*held)
        problem = assert_problem(refused, 503, "overloaded")
        assert refused.headers["retry-after"] == "1" and "limit 2" in problem["detail"]
        assert [a.status_code for a in answers] == [200, 200]
        assert sorted(arrived) == ["/0", "/1"]
    finally:
        await runner.cleanup()
