"""Shared parts for the TLS interception tests (issue 18): an HTTPS upstream with its own test CA,
a sidecar intercepting TLS for it, and the agent's trust in the sidecar's pod-local CA."""

from __future__ import annotations

import json
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
from aiohttp import web

from harness import RunningSidecar, serve_app
from tls_certs import make_ca_and_server

# tests/conftest.py's make_sidecar, typed here: `from conftest import` is ambiguous once a subdirectory has its own.
SidecarFactory = Callable[..., Awaitable[RunningSidecar]]

AGENT_SECRET = "Bearer agent-standing-secret"
CRM_HOST = "crm.example.com"


@dataclass
class Received:
    method: str
    path_qs: str
    headers: dict[str, str]
    body: bytes


@dataclass
class HttpsTool:
    """An HTTPS upstream (certificate from its own test CA) that records what it receives."""

    url: str = ""
    ca: Path = Path()
    seen: list[Received] = field(default_factory=list)
    runner: web.AppRunner | None = None

    async def start(self, directory: Path) -> None:
        ca, cert, key = make_ca_and_server(directory)
        self.ca = ca

        async def handle(request: web.Request) -> web.Response:
            self.seen.append(Received(request.method, request.path_qs, {k.lower(): v for k, v in request.headers.items()},
                                      await request.read()))
            return web.json_response({"tool": "https-echo", "method": request.method, "path": request.path})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        self.runner, port = await serve_app(app, context)
        self.url = f"https://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def intercepting_route(name: str, host: str, upstream: str, ca_bundle: Path | None, **extra: Any) -> dict[str, Any]:
    route: dict[str, Any] = {"name": name, "match": {"host": host}, "upstream": upstream, "intercept_tls": True, **extra}
    if ca_bundle is not None:
        route["tls"] = {"ca_bundle": str(ca_bundle)}
    return route


async def sidecar_ca(sc: RunningSidecar, directory: Path) -> Path:
    """The pod-local CA as an agent gets it: GET /ca.pem on the admin listener."""
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{sc.admin}/ca.pem")
    assert response.status_code == 200, response.text
    assert b"PRIVATE KEY" not in response.content
    path = directory / "sidecar-ca.pem"
    path.write_bytes(response.content)
    return path


def trusting(ca: Path) -> ssl.SSLContext:
    """A client context that trusts the sidecar's CA only (not the system store, not the upstream's CA)."""
    return ssl.create_default_context(cafile=str(ca))


def assert_minted_credential(seen: Received, sc: RunningSidecar) -> dict[str, Any]:
    """The upstream saw a credential minted by the sidecar for this agent, never the agent's own."""
    authorization = seen.headers.get("authorization", "")
    assert authorization.startswith("Bearer ") and authorization != AGENT_SECRET
    assert "agent-standing-secret" not in json.dumps(seen.headers)
    claims: dict[str, Any] = jwt.decode(authorization.split(" ", 1)[1], options={"verify_signature": False})
    assert claims["sub"] == sc.sidecar.config.identity.static
    return claims


async def audit_flushed(sc: RunningSidecar) -> list[dict[str, Any]]:
    """Every event queued so far, once written: a marker's receipt comes after them (the writer is FIFO)."""
    await sc.sidecar.path.audit.record({"type": "test.marker"})
    return [json.loads(line) for line in sc.audit_path.read_text().splitlines() if line.strip()]
