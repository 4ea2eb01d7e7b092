"""TLS to the upstream is verified by default; a route can name its own CA bundle."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from harness import serve_app
from tls_certs import make_ca_and_server


@pytest.fixture
async def tls_tool(tmp_path: Path) -> AsyncIterator[tuple[str, Path, list[str]]]:
    ca, cert, key = make_ca_and_server(tmp_path / "pki")
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.json_response({"tls": True})

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    runner, port = await serve_app(app, context)
    yield f"https://127.0.0.1:{port}", ca, seen
    await runner.cleanup()


def tls_route(upstream: str, **tls: Any) -> list[dict[str, Any]]:
    return [{"name": "secure", "match": {"path_prefix": "/secure"}, "upstream": upstream, **({"tls": tls} if tls else {})}]


async def test_https_upstream_with_the_routes_ca_bundle(make_sidecar: Any, tls_tool: Any) -> None:
    url, ca, seen = tls_tool
    sc = await make_sidecar(routes=tls_route(url, ca_bundle=str(ca)))
    async with httpx.AsyncClient() as agent:
        response = await agent.get(f"{sc.proxy}/secure/status")
    assert response.status_code == 200 and response.json() == {"tls": True}
    assert seen == ["/status"]


async def test_untrusted_upstream_certificate_is_refused(make_sidecar: Any, tls_tool: Any) -> None:
    url, _, seen = tls_tool
    sc = await make_sidecar(routes=tls_route(url))
    async with httpx.AsyncClient() as agent:
        response = await agent.get(f"{sc.proxy}/secure/status")
    assert response.status_code == 502
    assert response.json()["code"] == "upstream_error"
    assert seen == []
