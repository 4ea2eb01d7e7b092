"""The tool-side verifier: a real aiohttp tool and a real ASGI (Starlette on uvicorn) tool behind the sidecar."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn
from aiohttp import web
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from harness import SidecarFactory
from harness import RunningSidecar, free_port
from sidecar.verifier import AGENT_CALL, ToolVerifier, VerifierASGIMiddleware, aiohttp_middleware

CALLER = "tool-introspection-token-0123456789"


def routes_to(port: int) -> list[dict[str, Any]]:
    return [{"name": "crm", "match": {"path_prefix": "/crm"}, "upstream": f"http://127.0.0.1:{port}/crm"}]


def verifier_for(sc: RunningSidecar, introspect: bool = False) -> ToolVerifier:
    return ToolVerifier(jwks_url=f"{sc.admin}/.well-known/jwks.json", issuer="agent-sidecar", audience="crm",
                        introspect_url=f"{sc.admin}/introspect" if introspect else None,
                        introspect_token=CALLER if introspect else None)


class AiohttpTool:
    """The ten-line tool of docs/credentials.md, plus a record of what it served."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.runner: web.AppRunner | None = None
        self.served: list[dict[str, Any]] = []

    async def start(self, verifier: ToolVerifier) -> None:
        async def handle(request: web.Request) -> web.Response:
            call = request[AGENT_CALL]
            self.served.append({"sub": call.subject, "task": call.task_id, "body": await request.read(),
                                "token": request.headers["Authorization"][7:]})
            return web.json_response({"ok": True, "agent": call.subject, "scopes": list(call.scopes)})

        app = web.Application(middlewares=[aiohttp_middleware(verifier)])
        app.router.add_route("*", "/crm/{tail:.*}", handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()


@pytest.fixture
async def aiohttp_tool() -> AsyncIterator[AiohttpTool]:
    tool = AiohttpTool(free_port())
    yield tool
    await tool.stop()


async def test_calls_through_the_sidecar_are_served_and_anything_else_is_refused(
        make_sidecar: SidecarFactory, aiohttp_tool: AiohttpTool) -> None:
    sc = await make_sidecar(routes=routes_to(aiohttp_tool.port))
    await aiohttp_tool.start(verifier_for(sc))
    async with httpx.AsyncClient() as agent:
        ok = await agent.get(sc.proxy + "/crm/customers/42?full=1")
        assert ok.status_code == 200, ok.text
        assert ok.json()["agent"] == "spiffe://test/ns/agents/sa/agent-under-test" and ok.json()["scopes"] == ["crm:read"]
        # An agent that bypasses the sidecar has no credential.
        direct = await agent.get(f"http://127.0.0.1:{aiohttp_tool.port}/crm/customers/42")
        assert direct.status_code == 401 and direct.json()["code"] == "missing_credential"

    # A credential captured at the tool is good for its own request only.
    async with httpx.AsyncClient() as agent:
        assert (await agent.get(sc.proxy + "/crm/customers/7")).status_code == 200
    captured = aiohttp_tool.served[-1]["token"]
    tool = f"http://127.0.0.1:{aiohttp_tool.port}"
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {captured}"}) as thief:
        same = await thief.get(f"{tool}/crm/customers/7")
        other_path = await thief.get(f"{tool}/crm/customers/8")
        other_method = await thief.delete(f"{tool}/crm/customers/7")
        other_body = await thief.request("GET", f"{tool}/crm/customers/7", content=b"extra")
    assert same.status_code == 401 and same.json()["code"] == "replayed"  # each jti is served once
    for refused in (other_path, other_method, other_body):
        assert refused.status_code == 403 and refused.json()["code"] == "wrong_request"
    async with httpx.AsyncClient() as thief:
        forged = await thief.get(f"{tool}/crm/customers/7", headers={"Authorization": f"Bearer {captured[:-4]}AAAA"})
    assert forged.status_code == 401


async def test_introspection_makes_a_completed_tasks_credentials_useless_at_the_tool(
        make_sidecar: SidecarFactory, aiohttp_tool: AiohttpTool) -> None:
    sc = await make_sidecar(routes=routes_to(aiohttp_tool.port), introspection={"tokens": [CALLER]})
    await aiohttp_tool.start(verifier_for(sc, introspect=True))
    tool = f"http://127.0.0.1:{aiohttp_tool.port}"
    async with httpx.AsyncClient() as agent:
        task_id = (await agent.post(f"{sc.admin}/v1/tasks", json={"intent": "read"})).json()["id"]
        assert (await agent.get(sc.proxy + "/crm/a", headers={"X-Agent-Task": task_id})).status_code == 200
        captured = aiohttp_tool.served[-1]["token"]
        assert aiohttp_tool.served[-1]["task"] == task_id
        replay = await agent.get(f"{tool}/crm/a", headers={"Authorization": f"Bearer {captured}"})
        assert replay.status_code == 401 and replay.json()["code"] == "replayed"  # still active, but used
        assert (await agent.post(f"{sc.admin}/v1/tasks/{task_id}/complete")).status_code == 200
        revoked = await agent.get(f"{tool}/crm/a", headers={"Authorization": f"Bearer {captured}"})
    assert revoked.status_code == 401 and revoked.json()["code"] == "revoked"  # introspection is asked first


async def test_introspection_unreachable_fails_closed(make_sidecar: SidecarFactory, aiohttp_tool: AiohttpTool) -> None:
    sc = await make_sidecar(routes=routes_to(aiohttp_tool.port))  # no introspection callers: every ask is refused
    await aiohttp_tool.start(verifier_for(sc, introspect=True))
    async with httpx.AsyncClient() as agent:
        response = await agent.get(sc.proxy + "/crm/a")
    assert response.status_code == 503 and response.json()["code"] == "introspection_unavailable"


@pytest.fixture
async def asgi_tool() -> AsyncIterator[dict[str, Any]]:
    holder: dict[str, Any] = {"port": free_port(), "served": []}
    yield holder
    server = holder.get("server")
    if server is not None:
        server.should_exit = True
        await holder["task"]


async def start_asgi_tool(holder: dict[str, Any], verifier: ToolVerifier) -> None:
    async def refund(request: Request) -> JSONResponse:
        call = request.scope["state"]["agent_call"]
        body = await request.json()  # the middleware replays the body it hashed
        holder["served"].append(body)
        return JSONResponse({"refunded": body["amount"], "agent": call.subject, "decision": call.decision_id})

    app = VerifierASGIMiddleware(Starlette(routes=[Route("/crm/refunds", refund, methods=["POST"])]), verifier)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=holder["port"], log_level="warning", lifespan="off"))
    holder["server"], holder["task"] = server, asyncio.create_task(server.serve())
    deadline = time.monotonic() + 15
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        await asyncio.sleep(0.02)


async def test_the_asgi_middleware_checks_the_body_it_was_minted_for(
        make_sidecar: SidecarFactory, asgi_tool: dict[str, Any]) -> None:
    sc = await make_sidecar(routes=routes_to(asgi_tool["port"]))
    await start_asgi_tool(asgi_tool, verifier_for(sc))
    async with httpx.AsyncClient() as agent:
        task_id = (await agent.post(f"{sc.admin}/v1/tasks", json={"intent": "refund"})).json()["id"]
        ok = await agent.post(sc.proxy + "/crm/refunds", json={"amount": 12}, headers={"X-Agent-Task": task_id})
        assert ok.status_code == 200, ok.text
        assert ok.json()["refunded"] == 12 and ok.json()["decision"]
        direct = await agent.post(f"http://127.0.0.1:{asgi_tool['port']}/crm/refunds", json={"amount": 12})
    assert direct.status_code == 401
    assert asgi_tool["served"] == [{"amount": 12}]
