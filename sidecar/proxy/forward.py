"""Step 5, forward: send the call upstream with the minted credential; stream the answer back.

At most once: the upstream receives each decided call once or not at all. aiohttp
resends an idempotent request when a pooled connection drops before the answer; that
would run an approved DELETE twice under one decision id, so the retry is switched
off and a dropped connection is a 502 for the agent to decide about.

Verbatim: the target is sent exactly as canonicalised and judged (yarl ``encoded=True``:
no re-quoting), the body exactly as hashed.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from collections.abc import Callable
from typing import Protocol

import aiohttp
from aiohttp import web
from yarl import URL

from ..config import Route
from ..documents import InterceptedCall, MintedCredential
from ..problems import Refusal
from .headers import response_headers
from .mcp_catalog import ResponseTap


@dataclass(frozen=True)
class UpstreamResult:
    status: int
    bytes_sent: int
    content_type: str = ""
    interrupted_by: str | None = None  # "upstream" or "agent" when the answer was not relayed whole


class Forwarder(Protocol):
    async def forward(self, request: web.BaseRequest, call: InterceptedCall, credential: MintedCredential,
                      decision_header: str, tap: ResponseTap | None = None,
                      on_answer: Callable[[], None] | None = None) -> tuple[web.StreamResponse, UpstreamResult]:
        """Send the call upstream and stream the answer back; ``tap`` sees a copy of the answer's bytes;
        ``on_answer`` is called once the upstream's status line has arrived, before the answer is relayed."""
        ...

    async def close(self) -> None: ...


def disable_resend(session: aiohttp.ClientSession) -> None:
    """Turn off aiohttp's silent resend of idempotent requests on a dropped pooled connection.

    There is no public switch; the attribute is checked so that an aiohttp that renames it
    fails here, at start-up, and tests/adversarial show a resend if it ever comes back.
    """
    if not hasattr(session, "_retry_connection"):
        raise RuntimeError("this aiohttp has no _retry_connection switch; refusing to forward without at-most-once")
    session._retry_connection = False


def ssl_context(route: Route) -> ssl.SSLContext | bool:
    if not route.tls_verify:
        return False
    context = ssl.create_default_context(cafile=str(route.ca_bundle) if route.ca_bundle else None)
    return context


def _timeout(route: Route) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=route.timeout_seconds)


class HttpForwarder:
    """One pooled aiohttp client; TLS verified by default, per-route CA bundles."""

    def __init__(self, routes: tuple[Route, ...]) -> None:
        self._ssl = {route.name: ssl_context(route) for route in routes}
        self._timeouts = {route.name: _timeout(route) for route in routes}
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=256, ttl_dns_cache=60)
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            )
            disable_resend(self._session)
        return self._session

    async def forward(self, request: web.BaseRequest, call: InterceptedCall, credential: MintedCredential,
                      decision_header: str, tap: ResponseTap | None = None,
                      on_answer: Callable[[], None] | None = None) -> tuple[web.StreamResponse, UpstreamResult]:
        headers = list(call.headers)
        if credential.header:
            headers.append((credential.header, credential.value.reveal()))
        headers.append(("X-Agent-Decision", decision_header))
        timeout = self._timeouts.get(call.route.name) or _timeout(call.route)
        try:
            upstream = await self._client().request(
                call.method, URL(call.target_url, encoded=True), headers=headers, data=call.body if call.body else None,
                allow_redirects=False, ssl=self._ssl.get(call.route.name, True), timeout=timeout,
            )
        except asyncio.TimeoutError:
            raise Refusal("upstream_timeout", f"upstream {call.route.name} did not answer in time",
                          extra={"upstream_may_have_acted": True}) from None
        except aiohttp.ClientError as exc:
            # Failing to connect sent nothing; anything later (a reset, a closed connection) may come after the
            # upstream read the request, and perhaps acted on it.
            sent = not isinstance(exc, aiohttp.ClientConnectorError)
            raise Refusal("upstream_error", f"upstream {call.route.name} failed: {type(exc).__name__}",
                          extra={"upstream_may_have_acted": sent}) from None
        if on_answer is not None:
            on_answer()
        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in response_headers(upstream.headers):
                response.headers.add(name, value)
            if "Content-Encoding" in upstream.headers:
                response.headers["Content-Encoding"] = upstream.headers["Content-Encoding"]
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            if tap is not None:
                tap.begin(upstream.content_type)
            try:
                return response, await _relay(request, response, upstream, tap)
            finally:
                if tap is not None:
                    tap.finish()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


async def _relay(request: web.BaseRequest, response: web.StreamResponse, upstream: aiohttp.ClientResponse,
                 tap: ResponseTap | None) -> UpstreamResult:
    """Stream the upstream's answer to the agent; either side may stop it, and the result says which."""
    sent = 0
    try:
        await response.prepare(request)
    except ConnectionError:  # the agent hung up before the answer: still the upstream's answer to record
        return UpstreamResult(upstream.status, 0, upstream.content_type, interrupted_by="agent")
    while True:
        try:
            chunk = await upstream.content.readany()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            # Headers are gone already: cut the connection so the agent sees a truncated answer.
            if request.transport is not None:
                request.transport.close()
            return UpstreamResult(upstream.status, sent, upstream.content_type, interrupted_by="upstream")
        if tap is not None and chunk:
            tap.feed(chunk)
        try:
            if not chunk:
                await response.write_eof()
                return UpstreamResult(upstream.status, sent, upstream.content_type)
            await response.write(chunk)
        except ConnectionError:  # the agent hung up (aiohttp's ClientConnectionResetError is one)
            return UpstreamResult(upstream.status, sent, upstream.content_type, interrupted_by="agent")
        sent += len(chunk)
