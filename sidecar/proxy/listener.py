"""The proxy listener: aiohttp's strict HTTP/1.1 parser, with the refusals and bounds a proxy needs.

- A request the parser itself refuses (CL+TE, two Content-Lengths, bare LF, a bad
  header byte, ...) is answered with problem+json and a stable code, echoes nothing
  of the request, and logs one line: never a traceback, never the raw bytes.
- Request bodies are never decompressed here: the interceptor decides about
  Content-Encoding (sidecar/proxy/body.py).
- A request head must arrive within ``header_timeout_seconds`` of its first byte; an
  idle kept-alive connection is closed after ``idle_timeout_seconds``; at most
  ``max_connections`` connections are open: one more is answered 503 and closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, LineTooLong
from aiohttp.web_protocol import RequestHandler

from ..config import ConnectionLimits
from ..problems import Refusal

log = logging.getLogger("sidecar.proxy")

# Called for each refusal made below the request path, so that it is counted and audited.
RefusalSink = Callable[[Refusal], None]


def _raw_problem(refusal: Refusal) -> bytes:
    body = refusal.problem_json()
    head = (f"HTTP/1.1 {refusal.status} {refusal.title}\r\nContent-Type: application/problem+json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


class GuardedRequestHandler(RequestHandler):
    """One connection of the proxy listener."""

    def __init__(self, manager: GuardedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = manager
        self._head_timer: asyncio.TimerHandle | None = None
        self._serving = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if len(self._guard.connections) > self._guard.limits.max_connections:
            self._refuse_connection(Refusal("overloaded", "too many open connections", headers={"Retry-After": "1"}))

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and not self._serving and data:
            self._head_timer = self._loop.call_later(self._guard.limits.header_timeout_seconds, self._head_too_slow)
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def serving(self, active: bool) -> None:
        """The request path started (its head is complete) or finished one request."""
        self._serving = active
        self._cancel_head_timer()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if not self._serving:
            timeout = self._guard.limits.header_timeout_seconds
            self._refuse_connection(Refusal("request_timeout", f"the request head was not received within {timeout:g}s"))

    def _refuse_connection(self, refusal: Refusal) -> None:
        self._guard.on_refusal(refusal)
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(_raw_problem(refusal))
        self.force_close()
        if transport is not None:
            transport.close()

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        refusal = _parser_refusal(status, exc)
        log.info("refused by the HTTP parser: %s (%s)", refusal.code, type(exc).__name__ if exc else status)
        self._guard.on_refusal(refusal)
        response = web.Response(status=refusal.status, body=refusal.problem_json(), content_type="application/problem+json")
        response.force_close()
        return response


def _parser_refusal(status: int, exc: BaseException | None) -> Refusal:
    if isinstance(exc, LineTooLong) or status == 431:
        return Refusal("headers_too_large", "the request line or a header is too long")
    if isinstance(exc, BadHttpMethod):
        return Refusal("method_not_allowed", "the parser does not know this method")
    if status == 413:
        return Refusal("body_too_large", "the request body is too large")
    if status >= 500:
        return Refusal("internal_error", "internal error while reading the request")
    return Refusal("bad_request", "the request is not well-formed HTTP/1.1")


class GuardedServer(web.Server):
    def __init__(self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]], *,
                 limits: ConnectionLimits, on_refusal: RefusalSink, **kwargs: Any) -> None:
        super().__init__(_marking(handler), auto_decompress=False, keepalive_timeout=limits.idle_timeout_seconds,
                         **kwargs)
        self.limits = limits
        self.on_refusal = on_refusal

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, **self._kwargs)


def _marking(handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
             ) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
    """Tell the connection when a request is being served, so the head timer leaves it alone."""

    async def serve(request: web.BaseRequest) -> web.StreamResponse:
        protocol = request.protocol
        guarded = protocol if isinstance(protocol, GuardedRequestHandler) else None
        if guarded is not None:
            guarded.serving(True)
        try:
            return await handler(request)
        finally:
            if guarded is not None:
                guarded.serving(False)

    return serve
