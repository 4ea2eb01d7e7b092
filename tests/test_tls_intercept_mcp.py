"""The MCP SDK's own client, unmodified but for its proxy and trust store, speaking streamable HTTP to an MCP
server (same SDK) behind https:// through the intercepting sidecar (issue 18): allowed, denied and held
tools/call, each decided inside the TLS connection; the server sees the minted credential only."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import jwt
import pytest
import uvicorn
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer

from harness import free_port
from tls_certs import make_ca_and_server
from tls_intercept_support import AGENT_SECRET, SidecarFactory, audit_flushed, intercepting_route, sidecar_ca, trusting

MCP_HOST = "mcp.example.com"
Scope = MutableMapping[str, Any]
Asgi = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


@dataclass
class HttpsMcp:
    url: str
    ca: Path
    calls: list[str] = field(default_factory=list)
    authorizations: list[str] = field(default_factory=list)


def recording_authorization(app: Asgi, into: list[str]) -> Asgi:
    async def wrapped(scope: Scope, receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            into.append(headers.get(b"authorization", b"").decode())
        await app(scope, receive, send)

    return wrapped


@pytest.fixture
async def https_mcp(tmp_path: Path) -> AsyncIterator[HttpsMcp]:
    ca, cert, key = make_ca_and_server(tmp_path / "mcp-pki")
    server = MCPServer("tools-behind-https")
    port = free_port()
    upstream = HttpsMcp(f"https://127.0.0.1:{port}", ca)

    @server.tool()
    def get_weather(city: str) -> str:
        upstream.calls.append("get_weather")
        return f"sunny in {city}"

    @server.tool()
    def delete_record(record_id: int) -> str:
        upstream.calls.append("delete_record")
        return f"deleted {record_id}"

    @server.tool()
    def publish_post(text: str) -> str:
        upstream.calls.append("publish_post")
        return "published"

    app = recording_authorization(server.streamable_http_app(stateless_http=True, json_response=True),
                                  upstream.authorizations)
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                                       ssl_certfile=str(cert), ssl_keyfile=str(key)))
    task = asyncio.create_task(uv.serve())
    while not uv.started:
        await asyncio.sleep(0.01)  # readiness poll of an in-process server, not a timing assumption
    yield upstream
    uv.should_exit = True
    await task


async def test_mcp_sdk_client_over_intercepted_https(make_sidecar: SidecarFactory, https_mcp: HttpsMcp,
                                                     tmp_path: Path) -> None:
    sc = await make_sidecar(routes=[intercepting_route("tools", MCP_HOST, https_mcp.url, https_mcp.ca, protocol="mcp")])
    ca = await sidecar_ca(sc, tmp_path)
    client = httpx2.AsyncClient(proxy=sc.proxy, verify=trusting(ca), trust_env=False,
                                headers={"Authorization": AGENT_SECRET})
    async with client, streamable_http_client(f"https://{MCP_HOST}/mcp", http_client=client) as streams:
        read, write = streams[0], streams[1]
        async with ClientSession(read, write) as session:
            await session.initialize()
            allowed: Any = await session.call_tool("get_weather", {"city": "Oslo"})
            denied: Any = await session.call_tool("delete_record", {"record_id": 7})
            held: Any = await session.call_tool("publish_post", {"text": "hello"})
    assert allowed.is_error is not True and allowed.content[0].text == "sunny in Oslo"
    assert denied.is_error is True and denied.meta["dev.agent-sidecar/problem"]["code"] == "denied"
    assert held.is_error is True
    problem = held.meta["dev.agent-sidecar/problem"]
    assert problem["code"] == "approval_required" and problem["approval_id"]
    assert https_mcp.calls == ["get_weather"]
    # Every message that reached the server carried a credential minted for it, never the agent's.
    assert https_mcp.authorizations and AGENT_SECRET not in https_mcp.authorizations
    subjects = {jwt.decode(a.split(" ", 1)[1], options={"verify_signature": False})["sub"]
                for a in https_mcp.authorizations}
    assert subjects == {sc.sidecar.config.identity.static}
    tools = [e["input"]["mcp"]["tool"] for e in await audit_flushed(sc)
             if e.get("type") == "decision" and (e["input"].get("mcp") or {}).get("method") == "tools/call"]
    assert tools == ["get_weather", "delete_record", "publish_post"]
