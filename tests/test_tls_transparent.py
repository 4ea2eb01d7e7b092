"""Transparent TLS (issue 18 item 3): a connection that reaches the proxy port and starts with a TLS
handshake (what the iptables overlay redirects when the agent dials https:// directly) is routed by SNI,
intercepted with the pod CA, and each request inside is decided. No SNI, or an SNI no route intercepts:
the handshake is refused with an alert, and a refusal event says why. The kernel part (REDIRECT and
SO_ORIGINAL_DST) is in tests/test_k8s_manifests.py's network-namespace test."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from harness import RunningSidecar
from tls_intercept_support import (SidecarFactory, AGENT_SECRET, CRM_HOST, HttpsTool, assert_minted_credential, audit_flushed,
                                   intercepting_route, sidecar_ca, trusting)


@pytest.fixture
async def https_tool(tmp_path: Path) -> AsyncIterator[HttpsTool]:
    tool = HttpsTool()
    await tool.start(tmp_path / "upstream-pki")
    yield tool
    await tool.stop()


@pytest.fixture
async def intercepting(make_sidecar: SidecarFactory, https_tool: HttpsTool, tmp_path: Path) -> tuple[RunningSidecar, Path]:
    sc = await make_sidecar(routes=[
        intercepting_route("crm", CRM_HOST, https_tool.url, https_tool.ca),
        {"name": "plain", "match": {"path_prefix": "/plain"}, "upstream": https_tool.url, "tls": {"ca_bundle": str(https_tool.ca)}},
    ])
    return sc, await sidecar_ca(sc, tmp_path)


async def exchange(sc: RunningSidecar, context: ssl.SSLContext, server_name: str | None, request: bytes) -> bytes:
    """Dial the proxy port with TLS directly, as a redirected agent connection arrives; send one request."""
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.sidecar.config.proxy.port, ssl=context,
                                                   server_hostname=server_name)
    try:
        writer.write(request)
        await writer.drain()
        return await reader.read()
    finally:
        writer.close()


def http_request(method: str, path: str, host: str = CRM_HOST, body: bytes = b"") -> bytes:
    head = (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {AGENT_SECRET}\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n")
    if body:
        head += "Content-Type: application/json\r\n"
    return head.encode() + b"\r\n" + body


def status_and_json(raw: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        chunks, rest = [], body
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            chunks.append(rest[:size])
            rest = rest[size + 2:]
        body = b"".join(chunks)
    parsed: dict[str, object] = json.loads(body)
    return status, parsed


async def test_a_redirected_tls_connection_is_routed_by_sni_and_each_request_decided(
        intercepting: tuple[RunningSidecar, Path], https_tool: HttpsTool) -> None:
    sc, ca = intercepting
    status, body = status_and_json(await exchange(sc, trusting(ca), CRM_HOST, http_request("GET", "/customers/42")))
    assert status == 200 and body["path"] == "/customers/42"
    status, body = status_and_json(await exchange(sc, trusting(ca), CRM_HOST,
                                                  http_request("POST", "/customers", body=b'{"name":"x"}')))
    assert status == 403 and body["code"] == "denied"
    status, body = status_and_json(await exchange(sc, trusting(ca), CRM_HOST, http_request("DELETE", "/customers/42")))
    assert status == 403 and body["code"] == "approval_required" and body["approval_id"]
    assert [(r.method, r.path_qs) for r in https_tool.seen] == [("GET", "/customers/42")]
    assert_minted_credential(https_tool.seen[0], sc)
    decisions = [e for e in await audit_flushed(sc) if e.get("type") == "decision"]
    assert [(e["input"]["request"]["mode"], e["outcome"]) for e in decisions] == [
        ("transparent_tls", "allow"), ("transparent_tls", "deny"), ("transparent_tls", "hold")]
    # On loopback nothing was redirected, so the kernel has no original destination to give.
    assert all("original_destination" not in e["input"]["request"] for e in decisions)


async def test_curl_dialling_https_straight_at_the_proxy_port(intercepting: tuple[RunningSidecar, Path],
                                                              https_tool: HttpsTool) -> None:
    """curl --connect-to: what an agent's https://crm.example.com/ becomes under the iptables overlay."""
    if shutil.which("curl") is None:
        pytest.skip("needs curl")
    sc, ca = intercepting
    environment = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    process = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--cacert", str(ca), "--connect-to", f"{CRM_HOST}:443:127.0.0.1:{sc.sidecar.config.proxy.port}",
        "-H", f"Authorization: {AGENT_SECRET}", "-w", "\n%{http_code}", f"https://{CRM_HOST}/customers/7",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=environment)
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    body, _, status = out.decode().rpartition("\n")
    assert status == "200" and json.loads(body)["path"] == "/customers/7"
    assert_minted_credential(https_tool.seen[0], sc)


@pytest.mark.parametrize("server_name, code", [(None, "tls_no_sni"), ("unknown.example.com", "tls_unknown_sni")])
async def test_no_sni_or_an_unknown_one_is_refused_with_an_alert_and_recorded(
        intercepting: tuple[RunningSidecar, Path], https_tool: HttpsTool, server_name: str | None, code: str) -> None:
    sc, ca = intercepting
    context = trusting(ca)
    if server_name is None:
        context.check_hostname = False  # dialling the IP literal: Python sends no SNI for it
    with pytest.raises(ssl.SSLError) as refused:
        await exchange(sc, context, server_name or "127.0.0.1", http_request("GET", "/customers/42"))
    assert "UNRECOGNIZED_NAME" in str(refused.value)
    refusals = [e for e in await audit_flushed(sc) if e.get("type") == "refusal"]
    assert [e["code"] for e in refusals] == [code]
    assert https_tool.seen == []
    assert sc.sidecar.tls is not None and sc.sidecar.tls.issued == 0


async def test_plain_http_on_the_same_port_is_unchanged(intercepting: tuple[RunningSidecar, Path],
                                                        https_tool: HttpsTool) -> None:
    sc, _ = intercepting
    async with httpx.AsyncClient(trust_env=False) as client:
        response = await client.get(f"{sc.proxy}/plain/status")
    assert response.status_code == 200 and https_tool.seen[0].path_qs == "/status"
