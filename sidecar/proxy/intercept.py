"""Step 1, intercept: which route, what request, which body, which MCP calls."""

from __future__ import annotations

import functools
import hashlib
import json
import re
from typing import Any
from urllib.parse import SplitResult, parse_qs, urlsplit

from aiohttp import web

from ..documents import InterceptedCall, Mode
from ..problems import Refusal
from ..secret import Secret
from . import headers as hdr
from . import mcp
from .routing import RouteMatchResult, RouteTable

# Encoded slashes, backslashes and dots make the path the policy sees differ from
# the path the upstream resolves; such paths are refused rather than guessed at.
_AMBIGUOUS_PATH = re.compile(r"%2f|%5c|%2e|\\|%00", re.IGNORECASE)
_DOT_SEGMENT = re.compile(r"(^|/)\.{1,2}(/|$)")
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*(\d{1,6})(?:$|[,;\s])", re.IGNORECASE)
_TOKEN = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class Interceptor:
    def __init__(self, routes: RouteTable, max_body_bytes: int) -> None:
        self.routes = routes
        self.max_body_bytes = max_body_bytes

    async def intercept(self, request: web.BaseRequest) -> InterceptedCall:
        mode, match = self._locate(request)
        route = match.route
        forward_headers = hdr.forwardable(request.headers, route.credential_headers)
        body = await self._read_body(request)
        content_type = request.headers.get("content-type", "")
        body_json = _parse_json(body, content_type)
        calls = mcp.parse_calls(body_json) if mcp.looks_like_jsonrpc(body_json) else ()
        upstream = _split_upstream(route.upstream)
        query_string = request.rel_url.raw_query_string if mode != "forward_proxy" else urlsplit(request.raw_path).query
        return InterceptedCall(
            route=route,
            mode=mode,
            method=request.method.upper(),
            scheme=upstream.scheme,
            host=(upstream.hostname or "").lower(),
            port=upstream.port or (443 if upstream.scheme == "https" else 80),
            path=match.upstream_path,
            query_string=query_string,
            query=parse_qs(query_string, keep_blank_values=True) if query_string else {},
            headers=forward_headers,
            body=body,
            body_json=body_json,
            body_sha256=hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256,
            content_type=content_type,
            mcp_calls=calls,
            task_id=_token(request, "X-Agent-Task"),
            approval_id=_token(request, "X-Agent-Approval"),
            prefer_wait_seconds=_prefer_wait(request),
            delegation=_secret_header(request, "X-Agent-Delegation"),
        )

    def intercept_connect(self, request: web.BaseRequest) -> InterceptedCall:
        """CONNECT host:port: only host and port are known, so only they are decided on."""
        authority = request.raw_path
        host, _, port_text = authority.rpartition(":")
        if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise Refusal("bad_request", "CONNECT target must be host:port")
        host, port = host.strip("[]").lower(), int(port_text)
        route = self.routes.for_tunnel(host, port)
        if route is None:
            raise Refusal("no_route", f"no route for {host}:{port}")
        if not route.allow_tunnel:
            raise Refusal("tunnel_denied", f"route {route.name} does not allow CONNECT tunnels; send plain HTTP through the proxy")
        upstream = urlsplit(route.upstream)
        return InterceptedCall(
            route=route, mode="connect", method="CONNECT", scheme=upstream.scheme, host=(upstream.hostname or "").lower(),
            port=upstream.port or (443 if upstream.scheme == "https" else 80), path="", query_string="", query={},
            headers=(), body=b"", body_json=None, body_sha256=hashlib.sha256(b"").hexdigest(), content_type="",
            task_id=_token(request, "X-Agent-Task"),
        )

    def _locate(self, request: web.BaseRequest) -> tuple[Mode, RouteMatchResult]:
        raw = request.raw_path
        if raw.lower().startswith(("http://", "https://")):
            target = urlsplit(raw)
            path = target.path or "/"
            _check_path(path)
            host, port = (target.hostname or ""), target.port or (443 if target.scheme == "https" else 80)
            match = self.routes.by_host(host, port, path)
            if match is None:
                raise Refusal("no_route", f"no route for {host}:{port}{path}")
            return "forward_proxy", match
        if not raw.startswith("/"):
            raise Refusal("bad_request", "request target must be origin-form or absolute-form")
        path = raw.split("?", 1)[0]
        _check_path(path)
        match = self.routes.by_prefix(path)
        if match is not None:
            return "route_prefix", match
        # Transparent mode: egress redirected by iptables arrives in origin-form with its Host.
        host, _, port_text = (request.headers.get("host") or "").partition(":")
        port = int(port_text) if port_text.isdigit() else 80
        match = self.routes.by_host(host, port, path) if host else None
        if match is None:
            raise Refusal("no_route", f"no route for {path}")
        return "transparent", match

    async def _read_body(self, request: web.BaseRequest) -> bytes:
        declared = request.content_length
        if declared is not None and declared > self.max_body_bytes:
            raise Refusal("body_too_large", f"body of {declared} bytes exceeds the limit of {self.max_body_bytes}",
                          extra={"limit_bytes": self.max_body_bytes})
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_chunked(65536):
            size += len(chunk)
            if size > self.max_body_bytes:
                raise Refusal("body_too_large", f"body exceeds the limit of {self.max_body_bytes} bytes",
                              extra={"limit_bytes": self.max_body_bytes})
            chunks.append(chunk)
        return b"".join(chunks)


@functools.lru_cache(maxsize=256)  # route upstreams: a fixed set
def _split_upstream(url: str) -> SplitResult:
    return urlsplit(url)


def _check_path(path: str) -> None:
    if _AMBIGUOUS_PATH.search(path) or _DOT_SEGMENT.search(path) or "//" in path:
        raise Refusal("bad_request", "ambiguous path: encoded separators, dot segments or empty segments")


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _parse_json(body: bytes, content_type: str) -> Any:
    if not body or not _is_json(content_type):
        return None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise Refusal("bad_request", "malformed JSON body") from None


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
