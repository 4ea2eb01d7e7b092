"""The proxy listener: aiohttp's strict HTTP/1.1 parser, with the refusals and bounds a proxy needs.

- A request the parser itself refuses (CL+TE, two Content-Lengths, bare LF, a bad
  header byte, ...) is answered with problem+json and a stable code, echoes nothing
  of the request, and logs one line: never a traceback, never the raw bytes.
- Each request line is checked byte for byte before the parser reads it (request_line.py):
  one that is not exactly ``method SP request-target SP HTTP/1.x CRLF`` is refused the
  same way, in its place among pipelined requests. A message after which that check
  cannot tell where the next one starts (a CONNECT, an Upgrade, odd framing) is the
  connection's last.
- Request bodies are never decompressed here: the interceptor decides about
  Content-Encoding (sidecar/proxy/body.py).
- A request head must arrive within ``header_timeout_seconds`` of its first byte; an
  idle kept-alive connection is closed after ``idle_timeout_seconds``; at most
  ``max_connections`` connections are open: one more is answered 503 and closed.
- TLS interception (sidecar/proxy/tls.py): a CONNECT to an intercepting route, or a
  redirected connection whose first byte starts a TLS handshake, is taken off this
  handler (which never reads it again) and terminated with a pod-CA leaf; the decrypted
  stream is served by a fresh handler of the same server, marked with its TlsSession.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, BadHttpMethod, LineTooLong
from aiohttp.web_protocol import RequestHandler

from ..config import ConnectionLimits
from ..problems import Refusal
from .request_line import RequestLineGate
from .tls import TLS_HANDSHAKE_RECORD, LeafIssuer, TlsSession, adopt, original_destination, served_host

log = logging.getLogger("sidecar.proxy")

# Called for each refusal made below the request path, so that it is counted and audited.
RefusalSink = Callable[[Refusal], None]


def _raw_problem(refusal: Refusal) -> bytes:
    body = refusal.problem_json()
    head = (f"HTTP/1.1 {refusal.status} {refusal.title}\r\nContent-Type: application/problem+json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


class GuardedRequestHandler(RequestHandler):
    """One connection of the proxy listener (or the decrypted stream of an intercepted TLS connection)."""

    def __init__(self, manager: GuardedServer, tls_session: TlsSession | None = None, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = manager
        self._head_timer: asyncio.TimerHandle | None = None
        self._serving = False
        self._first_bytes_seen = False
        self._gate = RequestLineGate(self.max_line_size)
        self._refused_head: Refusal | None = None  # refused by the gate, not answered yet
        self._answered = 0  # requests answered (or refused) on this connection
        self._responding = False  # a response is being written (finish_response)
        self._end_after_response = False  # once it is written, the connection ends
        # Set on handlers of decrypted connections only; the interceptor routes their requests by these.
        self.tls_session = tls_session
        self.served_host: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.tls_session is not None:
            # The TCP connection was admitted already, as the handler it was taken from; this one counts for it now.
            self.served_host = served_host(transport)
            super().connection_made(transport)
            return
        super().connection_made(transport)
        if self._guard.open_connections() > self._guard.limits.max_connections:
            self._refuse_connection(Refusal("overloaded", "too many open connections", headers={"Retry-After": "1"}))

    def data_received(self, data: bytes) -> None:
        if not self._first_bytes_seen and data:
            self._first_bytes_seen = True
            if data[0] == TLS_HANDSHAKE_RECORD and self.tls_session is None and self._guard.tls is not None:
                self._intercept_redirected_tls(bytes(data))
                return
        if self._head_timer is None and not self._serving and data and self._refused_head is None:
            self._head_timer = self._loop.call_later(self._guard.limits.header_timeout_seconds, self._head_too_slow)
        admitted, refusal = self._gate.admit(data)
        last = self._gate.last_head
        if last is not None and self._answered >= last:
            # The gate stopped reading in the body of a request answered already (refused from its head before
            # its body came): the bytes from here on were not checked, and no request of them may be served.
            self._end_unread()
            return
        if admitted or not data:  # no data: the parser is asked to go on with what it holds
            super().data_received(admitted)
        if refusal is not None:
            self._refused_head = refusal
        if self._refused_head is not None:
            self._queue_refused_head()

    def _queue_refused_head(self) -> None:
        """Queue the gate's refusal as the parser's own error would be: answered after every request before it."""
        refusal = self._refused_head
        if refusal is None or self._request_count < self._gate.heads:
            return  # the parser paused before reading them all; it goes on (and this is called again) later
        self._refused_head = None
        parser, self._parser = self._parser, _Raising(RefusedHead(refusal))  # type: ignore[assignment]
        try:
            super().data_received(b"")
        finally:
            self._parser = parser

    async def finish_response(self, request: web.BaseRequest, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        self._answered += 1
        last = self._gate.last_head
        if last is not None and self._answered >= last:
            resp.force_close()  # what follows was not read by the gate: no request of it is served
        self._responding = True
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self._responding = False
            if self._end_after_response:
                self.force_close()

    def _end_unread(self) -> None:
        """Read nothing more of this connection: it ends now, or once the response being written is."""
        if self._responding:
            self._end_after_response = True
        else:
            self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    # ---------------------------------------------------------------- TLS interception

    def intercept_connect(self, host: str, port: int) -> None:
        """Answer 200 to this CONNECT and terminate TLS with ``host``'s leaf; the caller's response is never sent.

        Raises LeafRefused (before anything is written) when no route intercepts ``host``."""
        tls = self._guard.tls
        if tls is None:
            raise Refusal("tunnel_denied", "TLS interception is not configured")
        context = tls.context_for(host)
        early, self._message_tail = self._message_tail, b""  # a client that did not wait for the 200
        transport = self._detach()
        if transport is None:
            return  # the agent went away
        transport.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        self._guard.hand_over(transport, TlsSession("connect", connect_host=host, connect_port=port), context, early)

    def _intercept_redirected_tls(self, client_hello: bytes) -> None:
        tls = self._guard.tls
        assert tls is not None
        transport = self._detach()
        if transport is None:
            return
        destination = original_destination(transport)
        describe = f" to {destination[0]}:{destination[1]}" if destination else ""
        session = TlsSession("transparent", original_destination=destination)
        self._guard.hand_over(transport, session, tls.transparent_context(describe), client_hello)

    def _detach(self) -> asyncio.Transport | None:
        """Give up the connection without closing it: this handler stops, its server forgets it."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return None
        self._cancel_head_timer()
        self.transport = None  # so that stopping below (and a response written later) cannot touch the socket
        self.force_close()
        # The server forgets this handler once it has stopped; until then it is not counted twice.
        self._guard.handed_over.add(self)
        task = self._task_handler
        if task is not None and not task.done():
            task.add_done_callback(lambda _: self._guard.handed_over.discard(self))
        else:
            self._guard.handed_over.discard(self)
        self._guard.connection_lost(self, None)
        return transport

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


class RefusedHead(BadHttpMessage):
    """A head the gate refused, raised as a parser error so that aiohttp answers it in order."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.detail)
        self.refusal = refusal


class _Raising:
    """Stands in for the parser for one call: RequestHandler queues the error it raises as the next message."""

    def __init__(self, error: RefusedHead) -> None:
        self.error = error

    def feed_data(self, data: bytes) -> tuple[Any, bool, bytes]:
        raise self.error


def _parser_refusal(status: int, exc: BaseException | None) -> Refusal:
    if isinstance(exc, RefusedHead):
        return exc.refusal
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
                 limits: ConnectionLimits, on_refusal: RefusalSink, tls: LeafIssuer | None = None,
                 tls_handshake_timeout: float = 10.0, **kwargs: Any) -> None:
        super().__init__(_marking(handler), auto_decompress=False, keepalive_timeout=limits.idle_timeout_seconds,
                         **kwargs)
        self.limits = limits
        self.on_refusal = on_refusal
        self.tls = tls
        self.tls_handshake_timeout = tls_handshake_timeout
        # Handlers whose connection went to TLS interception, until they have stopped: their TCP connection
        # is counted by the handler of its decrypted stream.
        self.handed_over: set[RequestHandler] = set()
        self.handshaking = 0  # connections between the hand-over and the end of their TLS handshake

    def open_connections(self) -> int:
        """TCP connections open on the proxy port, each counted once whatever handles it."""
        return len(self.connections) - len(self.handed_over) + self.handshaking

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, **self._kwargs)

    def hand_over(self, transport: asyncio.Transport, session: TlsSession, context: ssl.SSLContext, initial: bytes) -> None:
        """Terminate TLS on ``transport``; once the handshake is done a fresh handler serves the decrypted stream."""
        handler = GuardedRequestHandler(self, tls_session=session, loop=self._loop, **self._kwargs)
        try:
            handshake = adopt(transport, handler, context, initial, self.tls_handshake_timeout)
        except Exception as exc:  # noqa: BLE001 - fail closed: the connection goes, nothing was read
            log.warning("TLS interception could not start: %s", type(exc).__name__)
            transport.abort()
            return
        self.handshaking += 1  # the outcome is reported through the loop, after this
        handshake.add_done_callback(self._handshake_outcome)

    def _handshake_outcome(self, handshake: asyncio.Future[None]) -> None:
        self.handshaking -= 1
        _log_handshake(handshake)


def _log_handshake(handshake: asyncio.Future[None]) -> None:
    if handshake.cancelled():
        return
    error = handshake.exception()
    if error is not None:
        # A refused server name was recorded by the SNI check; anything else is the agent's side
        # (it does not trust the pod CA, it went away): a log line, no request was read.
        log.info("intercepted TLS handshake failed: %s", getattr(error, "reason", None) or type(error).__name__)


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
