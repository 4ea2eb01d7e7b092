"""HTTPS from unmodified agents (issue 18): CONNECT to a route with ``intercept_tls`` is terminated with a
leaf from the pod-local CA, and each request inside is decided, credentialed and forwarded over verified
TLS exactly as plain HTTP is. Agents: httpx with ``proxy=``, curl with ``-x``, the MCP SDK's client."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness import RunningSidecar, send_connect
from sidecar.proxy.listener import GuardedServer
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
        intercepting_route("crm", CRM_HOST, https_tool.url, https_tool.ca, credential={"strip_headers": ["X-Api-Key"]}),
        {"name": "tunnel-only", "match": {"host": "tunnel.example.com"}, "upstream": https_tool.url, "allow_tunnel": True},
        {"name": "plain", "match": {"host": "plain.example.com", "path_prefix": "/plain"}, "upstream": https_tool.url},
    ])
    return sc, await sidecar_ca(sc, tmp_path)


def agent(sc: RunningSidecar, ca: Path) -> httpx.AsyncClient:
    """An unmodified agent: an HTTPS_PROXY and the pod CA in its trust store; nothing else changes."""
    return httpx.AsyncClient(proxy=sc.proxy, verify=trusting(ca), trust_env=False,
                             headers={"Authorization": AGENT_SECRET, "X-Api-Key": "agent-key"})


async def test_httpx_allowed_denied_and_held_each_decided_inside_one_connection(
        intercepting: tuple[RunningSidecar, Path], https_tool: HttpsTool) -> None:
    sc, ca = intercepting
    async with agent(sc, ca) as client:
        allowed = await client.get(f"https://{CRM_HOST}/customers/42?fields=name%2Cemail")
        denied = await client.post(f"https://{CRM_HOST}/customers", json={"name": "x"})
        held = await client.delete(f"https://{CRM_HOST}/customers/42")
        again = await client.get(f"https://{CRM_HOST}/customers/43")
    assert allowed.status_code == 200 and allowed.json()["path"] == "/customers/42"
    assert allowed.http_version == "HTTP/1.1"
    assert denied.status_code == 403 and denied.headers["content-type"] == "application/problem+json"
    assert denied.json()["code"] == "denied" and denied.json()["decision_id"]
    assert held.status_code == 403 and held.json()["code"] == "approval_required" and held.json()["approval_id"]
    assert again.status_code == 200
    # Only the allowed calls reached the upstream, each with its own minted credential, never the agent's.
    assert [(r.method, r.path_qs) for r in https_tool.seen] == [("GET", "/customers/42?fields=name%2Cemail"),
                                                                ("GET", "/customers/43")]
    first, second = (assert_minted_credential(r, sc) for r in https_tool.seen)
    assert first["jti"] != second["jti"]
    assert first["req"]["uri"] == f"{https_tool.url}/customers/42?fields=name%2Cemail"
    assert all("x-api-key" not in r.headers for r in https_tool.seen)
    decisions = [e for e in await audit_flushed(sc) if e.get("type") == "decision"]
    assert [(e["input"]["request"]["method"], e["input"]["request"]["mode"], e["outcome"]) for e in decisions] == [
        ("GET", "tls_intercept", "allow"), ("POST", "tls_intercept", "deny"), ("DELETE", "tls_intercept", "hold"),
        ("GET", "tls_intercept", "allow")]
    # Keep-alive: one CONNECT, one TLS connection, four separate decisions.
    assert sc.sidecar.tls is not None and sc.sidecar.tls.issued == 1


async def test_curl_with_a_proxy_and_the_pod_ca(intercepting: tuple[RunningSidecar, Path], https_tool: HttpsTool,
                                                 tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("needs curl")
    sc, ca = intercepting
    environment = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}

    async def curl(*args: str) -> tuple[int, dict[str, Any]]:
        process = await asyncio.create_subprocess_exec(
            "curl", "-sS", "-x", sc.proxy, "--cacert", str(ca), "-H", f"Authorization: {AGENT_SECRET}",
            "-o", "-", "-w", "\n%{http_code}", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=environment)
        out, err = await process.communicate()
        assert process.returncode == 0, err.decode()
        body, _, status = out.decode().rpartition("\n")
        return int(status), json.loads(body)

    status, body = await curl(f"https://{CRM_HOST}/customers/42")
    assert status == 200 and body["tool"] == "https-echo"
    status, body = await curl("-X", "POST", "-H", "Content-Type: application/json", "-d", '{"name":"x"}',
                              f"https://{CRM_HOST}/customers")
    assert status == 403 and body["code"] == "denied"
    status, body = await curl("-X", "DELETE", f"https://{CRM_HOST}/customers/42")
    assert status == 403 and body["code"] == "approval_required"
    assert [(r.method, r.path_qs) for r in https_tool.seen] == [("GET", "/customers/42")]
    assert_minted_credential(https_tool.seen[0], sc)


async def test_curl_without_the_pod_ca_refuses_the_leaf(intercepting: tuple[RunningSidecar, Path],
                                                        https_tool: HttpsTool) -> None:
    """An agent that does not trust the pod CA gets nowhere: nothing is read, nothing forwarded."""
    sc, _ = intercepting
    async with httpx.AsyncClient(proxy=sc.proxy, verify=True, trust_env=False) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"https://{CRM_HOST}/customers/42")
    assert https_tool.seen == []


async def test_an_upstream_whose_certificate_does_not_verify_is_a_502(
        make_sidecar: SidecarFactory, https_tool: HttpsTool, tmp_path: Path) -> None:
    # No ca_bundle: the upstream's test CA is not trusted, so the sidecar must not talk to it.
    sc = await make_sidecar(routes=[intercepting_route("crm", CRM_HOST, https_tool.url, None)])
    ca = await sidecar_ca(sc, tmp_path)
    async with agent(sc, ca) as client:
        response = await client.get(f"https://{CRM_HOST}/customers/42")
    assert response.status_code == 502 and response.json()["code"] == "upstream_error"
    assert https_tool.seen == []


async def test_host_header_must_name_the_intercepted_host(intercepting: tuple[RunningSidecar, Path],
                                                           https_tool: HttpsTool) -> None:
    sc, ca = intercepting
    async with agent(sc, ca) as client:
        response = await client.get(f"https://{CRM_HOST}/customers/42", headers={"Host": "plain.example.com"})
    assert response.status_code == 421 and response.json()["code"] == "misdirected_request"
    assert https_tool.seen == []


async def test_connect_without_a_route_or_interception_keeps_todays_answers(
        intercepting: tuple[RunningSidecar, Path]) -> None:
    sc, _ = intercepting
    port = sc.sidecar.config.proxy.port
    for authority, code in (("nowhere.example.com:443", "no_route"), ("plain.example.com:443", "tunnel_denied")):
        _, writer, head = await send_connect(port, authority)
        writer.close()
        assert head.startswith(b"HTTP/1.1 403"), head
    assert sc.sidecar.tls is not None and sc.sidecar.tls.issued == 0 and len(sc.sidecar.tls) == 0


async def test_a_bad_request_line_inside_the_tls_connection_is_refused_in_its_place(
        intercepting: tuple[RunningSidecar, Path], https_tool: HttpsTool) -> None:
    """The decrypted stream is checked as plain HTTP is: the second of two pipelined requests has two spaces
    before its version (llhttp would read /customers/43), so it is refused after the first is answered."""
    sc, ca = intercepting
    reader, writer, head = await send_connect(sc.sidecar.config.proxy.port, f"{CRM_HOST}:443")
    assert head.startswith(b"HTTP/1.1 200")
    await writer.start_tls(trusting(ca), server_hostname=CRM_HOST)
    writer.write(f"GET /customers/42 HTTP/1.1\r\nHost: {CRM_HOST}\r\n\r\n"
                 f"GET /customers/43  HTTP/1.1\r\nHost: {CRM_HOST}\r\nConnection: close\r\n\r\n".encode())
    answer = await asyncio.wait_for(reader.read(), timeout=20)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200 ") and b" 400 Bad Request\r\n" in answer, answer[:600]
    refusal = answer[answer.index(b" 400 Bad Request\r\n"):]
    assert json.loads(refusal.partition(b"\r\n\r\n")[2])["code"] == "bad_request"
    assert [(r.method, r.path_qs) for r in https_tool.seen] == [("GET", "/customers/42")]


async def test_a_client_naming_another_server_in_sni_is_refused(intercepting: tuple[RunningSidecar, Path],
                                                               https_tool: HttpsTool) -> None:
    sc, ca = intercepting
    reader, writer, head = await send_connect(sc.sidecar.config.proxy.port, f"{CRM_HOST}:443")
    assert head.startswith(b"HTTP/1.1 200")
    with pytest.raises(ssl.SSLError) as refused:
        await writer.start_tls(trusting(ca), server_hostname="evil.example.com")
    assert "UNRECOGNIZED_NAME" in str(refused.value)  # an alert, not a reset
    writer.close()
    refusals = [e for e in await audit_flushed(sc) if e.get("type") == "refusal"]
    assert [e["code"] for e in refusals] == ["tls_sni_mismatch"]
    assert https_tool.seen == []


async def test_the_ca_endpoint_serves_the_certificate_the_leaves_chain_to(
        intercepting: tuple[RunningSidecar, Path]) -> None:
    sc, ca = intercepting
    assert sc.sidecar.tls is not None
    assert ca.read_bytes() == sc.sidecar.tls.ca.cert_pem
    state_ca = sc.sidecar.config.state_dir / "tls-ca"
    assert (state_ca / "ca-key.pem").stat().st_mode & 0o077 == 0


def _handshake_over(sock: Any, tls: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> None:
    while True:
        try:
            tls.do_handshake()
            sock.sendall(outgoing.read())
            return
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed during the handshake")
            incoming.write(data)


def _connect_with_an_early_client_hello(port: int, ca: Path) -> bytes:
    """CONNECT and the ClientHello in one write, as a client that does not wait for the 200 does."""
    import socket

    context = trusting(ca)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=CRM_HOST)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    client_hello = outgoing.read()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"CONNECT {CRM_HOST}:443 HTTP/1.1\r\nHost: {CRM_HOST}:443\r\n\r\n".encode() + client_hello)
        received = b""
        while b"\r\n\r\n" not in received:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError(f"closed before the CONNECT was answered: {received!r}")
            received += data
        head, _, rest = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        incoming.write(rest)
        _handshake_over(sock, tls, incoming, outgoing)
        tls.write(f"GET /customers/9 HTTP/1.1\r\nHost: {CRM_HOST}\r\nConnection: close\r\n\r\n".encode())
        sock.sendall(outgoing.read())
        answer = b""
        while True:
            try:
                chunk = tls.read(65536)
            except ssl.SSLWantReadError:
                chunk = None
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return answer
            if chunk == b"":
                return answer
            if chunk:
                answer += chunk
                continue
            data = sock.recv(65536)
            if not data:
                return answer
            incoming.write(data)


async def test_a_client_hello_sent_with_the_connect_is_not_lost(intercepting: tuple[RunningSidecar, Path],
                                                                https_tool: HttpsTool) -> None:
    sc, ca = intercepting
    answer = await asyncio.to_thread(_connect_with_an_early_client_hello, sc.sidecar.config.proxy.port, ca)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert [(r.method, r.path_qs) for r in https_tool.seen] == [("GET", "/customers/9")]


async def test_an_intercepted_connection_counts_once_against_max_connections(
        make_sidecar: SidecarFactory, https_tool: HttpsTool, tmp_path: Path) -> None:
    sc = await make_sidecar(routes=[intercepting_route("crm", CRM_HOST, https_tool.url, https_tool.ca)],
                            limits={"max_body_bytes": 1048576, "max_connections": 2})
    ca = await sidecar_ca(sc, tmp_path)
    server = sc.sidecar.runners[0].server
    assert isinstance(server, GuardedServer)
    first, second = agent(sc, ca), agent(sc, ca)
    async with first, second:
        for client in (first, second):
            assert (await client.get(f"https://{CRM_HOST}/customers/1")).status_code == 200
        assert server.open_connections() == 2
        # A third connection is one too many, whatever it carries.
        async with httpx.AsyncClient(trust_env=False) as third:
            refused = await third.get(f"{sc.proxy}/anything")
        assert refused.status_code == 503 and refused.json()["code"] == "overloaded"
    # Closed by the agents: nothing is left counted (the handlers stop as the loop runs on).
    for _ in range(500):
        if server.open_connections() == 0 and not server.handed_over:
            break
        await asyncio.sleep(0.01)  # a poll of the server's own state with a deadline, not a timing assumption
    assert server.open_connections() == 0 and not server.handed_over and server.handshaking == 0
