"""The request path end to end over real sockets: httpx and curl as the agent, a real upstream."""

from __future__ import annotations

import asyncio
import json
import subprocess

import httpx
import jwt
import pytest
from typing import Any

from harness import EchoTool, RunningSidecar, open_task, send_connect


async def test_allowed_call_gets_a_minted_credential_and_loses_the_agents(sidecar: RunningSidecar, echo_tool: EchoTool) -> None:
    async with httpx.AsyncClient() as agent:
        response = await agent.get(f"{sidecar.proxy}/crm/customers/42?full=1",
                                   headers={"Authorization": "Bearer agent-own-secret", "X-Api-Key": "k-123",
                                            "Cookie": "session=abc"})
    assert response.status_code == 200
    assert response.headers["x-tool"] == "echo"
    [seen] = echo_tool.seen
    assert seen.path == "/crm/customers/42" and seen.query == "full=1"
    assert "x-api-key" not in seen.headers and "cookie" not in seen.headers
    [authorization] = seen.headers["authorization"]
    assert "agent-own-secret" not in authorization
    token = authorization.removeprefix("Bearer ")
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == "spiffe://test/ns/agents/sa/agent-under-test"
    assert claims["aud"] == "crm" and claims["scope"] == "crm:read"
    assert claims["req"]["method"] == "GET" and claims["req"]["uri"].endswith("/crm/customers/42?full=1")
    assert seen.headers["x-agent-decision"] == [claims["decision_id"]]


async def test_forward_proxy_mode_with_httpx_proxy(sidecar: RunningSidecar, echo_tool: EchoTool) -> None:
    async with httpx.AsyncClient(proxy=sidecar.proxy) as agent:
        response = await agent.get("http://crm.example.com/customers/7", headers={"Authorization": "Bearer mine"})
    assert response.status_code == 200, response.text
    [seen] = echo_tool.seen
    assert seen.path == "/crm/customers/7"
    assert seen.headers["authorization"][0].startswith("Bearer ey")


async def test_curl_through_the_proxy_with_x(sidecar: RunningSidecar, echo_tool: EchoTool) -> None:
    result = await asyncio.to_thread(
        subprocess.run, ["curl", "-sS", "-x", sidecar.proxy, "-H", "Proxy-Authorization: Basic c2VjcmV0",
                         "http://payments.example.com/balance"], capture_output=True, text=True, timeout=30)
    assert json.loads(result.stdout)["path"] == "/payments/balance"
    [seen] = echo_tool.seen
    assert "proxy-authorization" not in seen.headers


async def test_denied_call_is_problem_json_with_reasons(sidecar: RunningSidecar, echo_tool: EchoTool) -> None:
    async with httpx.AsyncClient() as agent:
        response = await agent.post(f"{sidecar.proxy}/crm/customers", json={"name": "x"})
    assert response.status_code == 403
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == "denied" and problem["reasons"] == ["fixture: writes need a task"]
    assert problem["decision_id"]
    assert echo_tool.seen == []


async def test_held_call_gets_an_approval_id(sidecar: RunningSidecar, echo_tool: EchoTool) -> None:
    task = await open_task(sidecar.admin)
    async with httpx.AsyncClient() as agent:
        response = await agent.delete(f"{sidecar.proxy}/crm/customers/42", headers={"X-Agent-Task": task})
        assert response.status_code == 403
        problem = response.json()
        assert problem["code"] == "approval_required" and problem["approval_id"].startswith("ap-")
        assert response.headers["retry-after"]
        status = await agent.get(f"{sidecar.admin}{problem['approval_status_url']}")
    assert status.json()["status"] == "pending"
    assert status.json()["binding"]["method"] == "DELETE"
    assert echo_tool.seen == []


async def test_write_inside_a_task_is_allowed_and_recorded_in_history(sidecar: RunningSidecar, echo_tool: EchoTool) -> None:
    task = await open_task(sidecar.admin)
    async with httpx.AsyncClient() as agent:
        response = await agent.post(f"{sidecar.proxy}/payments/refunds", json={"amount": 49},
                                    headers={"X-Agent-Task": task})
        assert response.status_code == 200, response.text
        shown = (await agent.get(f"{sidecar.admin}/v1/tasks/{task}")).json()
    assert shown["history"]["calls"] == 1 and shown["history"]["totals"]["amount"] == 49
    claims = jwt.decode(echo_tool.seen[0].headers["authorization"][0][7:], options={"verify_signature": False})
    assert claims["task_id"] == task


@pytest.mark.parametrize("target", ["/nowhere/x", "/crmx/customers"])
async def test_no_route(sidecar: RunningSidecar, echo_tool: EchoTool, target: str) -> None:
    async with httpx.AsyncClient() as agent:
        response = await agent.get(f"{sidecar.proxy}{target}")
    assert response.status_code == 403 and response.json()["code"] == "no_route"
    assert echo_tool.seen == []


async def test_forward_proxy_unknown_host_is_no_route(sidecar: RunningSidecar, echo_tool: EchoTool) -> None:
    async with httpx.AsyncClient(proxy=sidecar.proxy) as agent:
        response = await agent.get("http://evil.example.net/exfil")
    assert response.status_code == 403 and response.json()["code"] == "no_route"
    assert echo_tool.seen == []


async def test_connect_is_refused_without_a_tunnel_route(sidecar: RunningSidecar, echo_tool: EchoTool) -> None:
    _, writer, head = await send_connect(sidecar.sidecar.config.proxy.port, "crm.example.com:443")
    writer.close()
    assert head.startswith(b"HTTP/1.1 403")
    assert b"application/problem+json" in head
    assert echo_tool.seen == []


async def test_connect_tunnel_when_the_route_allows_it(make_sidecar: Any, echo_tool: EchoTool) -> None:
    sc = await make_sidecar(routes=[{"name": "tunnelled", "match": {"host": "tool.example.com:8443"},
                                     "upstream": echo_tool.base, "allow_tunnel": True},
                                    {"name": "closed", "match": {"host": "other.example.com"}, "upstream": echo_tool.base}])
    reader, writer, head = await send_connect(sc.sidecar.config.proxy.port, "tool.example.com:8443")
    assert head.startswith(b"HTTP/1.1 200")
    writer.write(b"GET /through/the/tunnel HTTP/1.1\r\nHost: tool\r\nConnection: close\r\n\r\n")
    await writer.drain()
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200") and b"/through/the/tunnel" in answer
    assert [s.path for s in echo_tool.seen] == ["/through/the/tunnel"]

    _, writer, head = await send_connect(sc.sidecar.config.proxy.port, "other.example.com:443")
    writer.close()
    assert head.startswith(b"HTTP/1.1 403")
    assert len(echo_tool.seen) == 1
