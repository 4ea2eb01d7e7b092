"""Step 1, intercept: which route, what request, which body, which MCP calls.

Everything the agent sent is parsed here once, strictly, into one InterceptedCall;
what could be read two ways is refused before the decision (docs/security.md).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import re
from urllib.parse import SplitResult, urlsplit

from aiohttp import web

from ..config import Route
from ..documents import InterceptedCall, McpCall, Mode
from ..problems import Refusal
from ..secret import Secret
from . import canonical
from . import headers as hdr
from . import mcp
from .body import BodyView, content_codings, decode_content, read_body
from .routing import RouteMatchResult, RouteTable
from .tls import TlsSession, original_destination

_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*(\d{1,6})(?:$|[,;\s])", re.IGNORECASE)
_TOKEN = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class BodyBudget:
    """The bytes of the bodies of every call in flight, together (``limits.max_body_bytes_in_flight``).

    ``max_in_flight`` bounds the calls and ``max_body_bytes`` each body, but a parsed JSON body can take ~25
    times its bytes (a 1 MiB array of empty arrays, 26 MB), so 4,096 calls of 1 MiB could hold 100 GB.
    A call is charged its body as it is read and until it ends; one that would go past the limit is
    refused as ``overloaded``, like a call past ``max_in_flight``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> None:
        """Charge ``size`` bytes (a negative size gives them back), or refuse the call."""
        if size > 0 and self.used + size > self.limit:
            raise Refusal("overloaded", f"the bodies of the calls in flight hold {self.used} bytes, this one would "
                          f"go past {self.limit} (limits.max_body_bytes_in_flight)", headers={"Retry-After": "1"})
        self.used += size

    def give_back(self, size: int) -> None:
        self.used -= size


class Interceptor:
    def __init__(self, routes: RouteTable, max_body_bytes: int, body_timeout_seconds: float = 30.0,
                 max_body_bytes_in_flight: int | None = None) -> None:
        self.routes = routes
        self.max_body_bytes = max_body_bytes
        self.body_timeout_seconds = body_timeout_seconds
        self.bodies = BodyBudget(max_body_bytes_in_flight if max_body_bytes_in_flight is not None else 16 * max_body_bytes)

    def release(self, call: InterceptedCall) -> None:
        """The call has ended (answered, refused, or its forwarding finished after the agent left)."""
        self.bodies.give_back(len(call.body))

    async def intercept(self, request: web.BaseRequest) -> InterceptedCall:
        mode, target, match = self._locate(request)
        route = match.route
        method = request.method.upper()
        if method not in route.methods:
            raise Refusal("method_not_allowed", f"{method[:20]} is not allowed on route {route.name}",
                          headers={"Allow": ", ".join(sorted(route.methods))})
        hdr.refuse_meaning_changers(request.headers)
        codings = content_codings(request.headers.getall("content-encoding", ()))
        forward_headers = hdr.forwardable(request.headers, route.credential_headers,
                                          also_drop=("content-encoding",) if codings else ())
        raw_body = await self._read_body(request)  # charged to self.bodies
        charged = len(raw_body)
        try:
            body = decode_content(raw_body, codings, route.content_encodings, self.max_body_bytes)
            self.bodies.take(len(body) - charged)  # a decoded body is charged as what it is
            charged = len(body)  # from here on the call's, given back by release(call)
            return self._call(request, mode, target, match, method, forward_headers, body)
        except BaseException:
            self.bodies.give_back(charged)
            raise

    def _call(self, request: web.BaseRequest, mode: Mode, target: canonical.Target, match: RouteMatchResult,
              method: str, forward_headers: tuple[tuple[str, str], ...], body: bytes) -> InterceptedCall:
        route = match.route
        content_type = hdr.single(request.headers, "content-type") or ""  # two types: either body could be read
        view = read_body(body, content_type)
        upstream = _split_upstream(route.upstream)
        return InterceptedCall(
            route=route,
            mode=mode,
            method=method,
            scheme=upstream.scheme,
            host=(upstream.hostname or "").lower(),
            port=upstream.port or (443 if upstream.scheme == "https" else 80),
            path=match.upstream_path,
            query_string=target.query,
            query=canonical.query_mapping(target.query),
            headers=forward_headers,
            body=body,
            body_json=view.value,
            body_readable=view.readable,
            body_sha256=hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256,
            content_type=content_type,
            mcp_calls=_mcp_calls(route, method, view, len(body), self.max_body_bytes),
            task_id=_token(request, "X-Agent-Task"),
            approval_id=_token(request, "X-Agent-Approval"),
            prefer_wait_seconds=_prefer_wait(request),
            delegation=_secret_header(request, "X-Agent-Delegation"),
            original_destination=_original_destination(request, mode),
        )

    def connect_target(self, request: web.BaseRequest) -> tuple[str, int, Route]:
        """CONNECT host:port and the route it matches; no route is refused."""
        host, port = canonical.authority(request.raw_path, 0)
        if port == 0:
            raise Refusal("bad_request", "CONNECT target must be host:port")
        host = host.strip("[]")
        route = self.routes.for_tunnel(host, port)
        if route is None:
            raise Refusal("no_route", f"no route for {host}:{port}")
        return host, port, route

    def intercept_connect(self, request: web.BaseRequest) -> InterceptedCall:
        """CONNECT host:port: only host and port are known, so only they are decided on."""
        host, port, route = self.connect_target(request)
        if not route.allow_tunnel:
            raise Refusal("tunnel_denied", f"route {route.name} does not allow CONNECT tunnels; send plain HTTP through the proxy")
        upstream = urlsplit(route.upstream)
        return InterceptedCall(
            route=route, mode="connect", method="CONNECT", scheme=upstream.scheme, host=(upstream.hostname or "").lower(),
            port=upstream.port or (443 if upstream.scheme == "https" else 80), path="", query_string="", query={},
            headers=(), body=b"", body_json=None, body_sha256=hashlib.sha256(b"").hexdigest(), content_type="",
            task_id=_token(request, "X-Agent-Task"),
        )

    def _locate(self, request: web.BaseRequest) -> tuple[Mode, canonical.Target, RouteMatchResult]:
        session = getattr(request.protocol, "tls_session", None)
        if isinstance(session, TlsSession):
            return self._locate_decrypted(request, session)
        raw = request.raw_path
        if raw.lower().startswith(("http://", "https://")):
            target = canonical.absolute_form(raw)
            assert target.host is not None and target.port is not None
            match = self.routes.by_host(target.host, target.port, target.path)
            if match is None:
                raise Refusal("no_route", f"no route for {target.host}:{target.port}{target.path}")
            return "forward_proxy", target, match
        if not raw.startswith("/"):
            raise Refusal("bad_request", "request target must be origin-form or absolute-form")
        target = canonical.origin_form(raw)
        match = self.routes.by_prefix(target.path)
        if match is not None:
            return "route_prefix", target, match
        # Transparent mode: egress redirected by iptables arrives in origin-form with its Host.
        host_header = hdr.single(request.headers, "host")
        match = None
        if host_header:
            host, port = canonical.authority(host_header, 80)
            match = self.routes.by_host(host, port, target.path)
        if match is None:
            raise Refusal("no_route", f"no route for {target.path}")
        return "transparent", target, match

    def _locate_decrypted(self, request: web.BaseRequest, session: TlsSession
                          ) -> tuple[Mode, canonical.Target, RouteMatchResult]:
        """A request inside an intercepted TLS connection: origin-form, for the host the connection was made to.

        The route is chosen by that host (the CONNECT host, or the SNI of a redirected connection) and the
        path; the Host header must name the same host and port, or the request is refused (421)."""
        served = getattr(request.protocol, "served_host", None)
        raw = request.raw_path
        if not raw.startswith("/"):
            raise Refusal("bad_request", "a request inside an intercepted TLS connection must be origin-form (/path)")
        target = canonical.origin_form(raw)
        host_header = hdr.single(request.headers, "host")
        if not host_header:
            raise Refusal("bad_request", "a Host header is required")
        host, port = canonical.authority(host_header, 443)
        if served is None or host != served or port != session.port():
            raise Refusal("misdirected_request", f"this TLS connection is for {served}:{session.port()}, not {host}:{port}")
        match = self.routes.by_host(host, port, target.path)
        if match is None or not match.route.intercept_tls:
            raise Refusal("no_route", f"no intercepting route for {host}:{port}{target.path}")
        return ("tls_intercept" if session.via == "connect" else "transparent_tls"), target, match

    async def _read_body(self, request: web.BaseRequest) -> bytes:
        if not request.body_exists:  # no Content-Length and no Transfer-Encoding, or a length of 0
            return b""
        declared = request.content_length
        if declared is not None and declared > self.max_body_bytes:
            raise Refusal("body_too_large", f"body of {declared} bytes exceeds the limit of {self.max_body_bytes}",
                          extra={"limit_bytes": self.max_body_bytes})
        self.bodies.take(declared or 0)  # refused before reading what would go past the budget
        charged = [declared or 0]
        try:
            async with asyncio.timeout(self.body_timeout_seconds):
                body = await self._read_chunks(request, charged)
        except TimeoutError:
            self.bodies.give_back(charged[0])
            raise Refusal("request_timeout", f"the body was not received within {self.body_timeout_seconds:g}s") from None
        except BaseException:
            self.bodies.give_back(charged[0])
            raise
        self.bodies.give_back(charged[0] - len(body))
        return body

    async def _read_chunks(self, request: web.BaseRequest, charged: list[int]) -> bytes:
        """The body, charging ``self.bodies`` for what goes past ``charged[0]`` as it arrives."""
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_chunked(65536):
            size += len(chunk)
            if size > self.max_body_bytes:
                raise Refusal("body_too_large", f"body exceeds the limit of {self.max_body_bytes} bytes",
                              extra={"limit_bytes": self.max_body_bytes})
            if size > charged[0]:
                self.bodies.take(size - charged[0])
                charged[0] = size
            chunks.append(chunk)
        return b"".join(chunks)


@functools.lru_cache(maxsize=256)  # route upstreams: a fixed set
def _split_upstream(url: str) -> SplitResult:
    return urlsplit(url)


# Streamable HTTP without a message: GET opens the server's event stream, DELETE ends the session.
_MCP_BODILESS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})


def _mcp_calls(route: Route, method: str, view: BodyView, size: int, max_body_bytes: int) -> tuple[McpCall, ...]:
    """JSON-RPC on MCP routes only; every other method carries exactly one well-formed message.

    Each message of a batch is judged and audited with the whole body, so a batch of n messages carries at
    most ``max_body_bytes / n``: one request never costs more evaluation input or audit bytes than the
    largest single call."""
    if not route.is_mcp:
        return ()
    if view.kind == "empty":
        if method in _MCP_BODILESS:
            return ()
        raise Refusal("bad_request", f"a {method} on MCP route {route.name} must carry a JSON-RPC message")
    if view.kind != "json":
        raise Refusal("bad_request", f"route {route.name} takes JSON-RPC 2.0 bodies only")
    calls = mcp.parse_calls(view.value)
    if len(calls) > 1 and size * len(calls) > max_body_bytes:
        raise Refusal("body_too_large", f"an MCP batch of {len(calls)} messages carries at most "
                      f"{max_body_bytes // len(calls)} bytes (each message is judged and audited with the whole body)",
                      extra={"limit_bytes": max_body_bytes // len(calls)})
    return calls


def _original_destination(request: web.BaseRequest, mode: Mode) -> str | None:
    """Where a redirected connection was going (SO_ORIGINAL_DST), as "ip:port"; None when not redirected."""
    if mode == "transparent_tls":
        session = getattr(request.protocol, "tls_session", None)
        destination = session.original_destination if isinstance(session, TlsSession) else None
    elif mode == "transparent" and request.transport is not None:
        destination = original_destination(request.transport)
    else:
        return None
    if destination is None:
        return None
    address, port = destination
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _token(request: web.BaseRequest, name: str) -> str | None:
    value = hdr.single(request.headers, name)
    if value is None:
        return None
    if not _TOKEN.match(value):
        raise Refusal("bad_request", f"header {name} is not a valid id")
    return value


def _secret_header(request: web.BaseRequest, name: str) -> Secret | None:
    value = hdr.single(request.headers, name)
    return Secret(value) if value is not None else None


def _prefer_wait(request: web.BaseRequest) -> float | None:
    for value in request.headers.getall("prefer", ()):
        found = _PREFER_WAIT.search(value)
        if found:
            return float(found.group(1))
    return None
