"""The tool side: prove that a call carries a credential the sidecar minted for exactly this request.

A tool owner adds a few lines (see docs/credentials.md)::

    verifier = ToolVerifier(jwks_url="http://127.0.0.1:15000/.well-known/jwks.json",
                            issuer="agent-sidecar", audience="crm")
    app = web.Application(middlewares=[aiohttp_middleware(verifier)])   # aiohttp: request[AGENT_CALL]
    app = VerifierASGIMiddleware(app, verifier)                          # any ASGI app

It fetches and caches the JWKS, checks signature, iss, aud, exp and nbf, then
checks that the request it guards is the one the token was minted for
(method, target URI, body sha256), when configured asks the sidecar's
``/introspect`` whether the credential was revoked, and last refuses a ``jti``
it has already accepted (a replay): in memory by default, in Redis when the
tool runs replicas (``RedisReplayCache``).
"""

from __future__ import annotations

import hashlib
import hmac
import heapq
import json
import math
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
from aiohttp import web

from .credentials.jwks import KeySource, UrlJwks
from .credentials.minter import request_binding
from .credentials.verify import SIDECAR_ALGORITHMS, TokenError, verify_with_source


class CredentialRejected(Exception):
    """The call must not be served. ``reason`` is a stable code, safe to return to the caller."""

    def __init__(self, reason: str, detail: str, status: int = 401) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.status = status

    def problem(self) -> dict[str, Any]:
        return {"type": "about:blank", "title": "Credential rejected", "status": self.status,
                "code": self.reason, "detail": self.detail}


@dataclass(frozen=True)
class VerifiedCall:
    """What the tool may rely on once verify() returned."""

    claims: dict[str, Any]
    subject: str
    scopes: tuple[str, ...]
    jti: str
    task_id: str | None
    decision_id: str | None
    approval_id: str | None
    delegation: dict[str, Any] | None = field(default=None)


class ReplayCache(Protocol):
    """Remembers every accepted ``jti`` until its credential can no longer be valid."""

    async def first_use(self, jti: str, forget_at: float) -> bool:
        """Record ``jti`` until ``forget_at`` (epoch seconds): True the first time, False for a replay.

        Raise CredentialRejected (503) when the answer cannot be known: the call is refused, never served twice.
        """
        ...


class MemoryReplayCache:
    """One process's accepted jtis, each kept until its credential's exp plus the leeway.

    Bounded: when ``max_entries`` unexpired jtis are held, new credentials are refused
    (``replay_cache_full``, 503) rather than an unexpired jti forgotten; only expired
    entries are ever evicted. Size it for the calls one tool serves within a credential
    lifetime (100,000 covers 1,500 calls/s at the sidecar's default 60 s TTL).
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._forget_at: dict[str, float] = {}
        self._by_expiry: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._forget_at)

    async def first_use(self, jti: str, forget_at: float) -> bool:
        self._forget_expired(time.time())
        if jti in self._forget_at:
            return False
        if len(self._forget_at) >= self.max_entries:
            raise CredentialRejected("replay_cache_full", "the tool cannot track more credentials right now; retry later", 503)
        self._forget_at[jti] = forget_at
        heapq.heappush(self._by_expiry, (forget_at, jti))
        return True

    def _forget_expired(self, now: float) -> None:
        while self._by_expiry and self._by_expiry[0][0] <= now:
            _, jti = heapq.heappop(self._by_expiry)
            self._forget_at.pop(jti, None)


class RedisReplayCache:
    """The accepted jtis of every replica of a tool, in one Redis: ``SET key 1 NX EXAT forget_at``.

    Redis unreachable refuses the call (``replay_check_unavailable``, 503). A command whose
    connection broke is sent once more; if the first attempt had been applied, the jti reads as
    already used and that one call is refused: never served twice.
    """

    def __init__(self, url: str, *, prefix: str = "agent-tool:jti:", timeout_seconds: float = 2.0) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError

        self.prefix = prefix
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout_seconds, socket_connect_timeout=timeout_seconds,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)))

    async def first_use(self, jti: str, forget_at: float) -> bool:
        from redis.exceptions import RedisError

        try:
            stored = await self._redis.set(self.prefix + jti, b"1", nx=True, exat=math.ceil(forget_at))
        except (RedisError, OSError):
            raise CredentialRejected("replay_check_unavailable", "the tool cannot check credentials for reuse right now",
                                     503) from None
        return bool(stored)

    async def close(self) -> None:
        await self._redis.aclose()


@dataclass
class ToolVerifier:
    issuer: str
    audience: str
    jwks_url: str | None = None
    keys: KeySource | None = None
    introspect_url: str | None = None
    introspect_token: str | None = None
    header: str = "Authorization"
    scheme: str = "Bearer"
    leeway_seconds: float = 5.0
    public_origin: str | None = None  # e.g. https://crm.example.com when a proxy in front rewrites Host/scheme
    max_body_bytes: int = 1024 * 1024
    # Each jti is served once; None switches the check off (only for tools that are idempotent by design).
    replay_cache: ReplayCache | None = field(default_factory=MemoryReplayCache)

    def __post_init__(self) -> None:
        if self.keys is None:
            if self.jwks_url is None:
                raise ValueError("ToolVerifier needs jwks_url or keys")
            self.keys = UrlJwks(self.jwks_url)

    def _token(self, value: str | None) -> str:
        if not value:
            raise CredentialRejected("missing_credential", f"no {self.header} header")
        if self.scheme:
            prefix = self.scheme.lower() + " "
            if value[: len(prefix)].lower() != prefix:
                raise CredentialRejected("missing_credential", f"{self.header} is not a {self.scheme} credential")
            return value[len(prefix):].strip()
        return value.strip()

    async def verify(self, *, credential: str | None, method: str, target_uri: str, body: bytes) -> VerifiedCall:
        """Everything in order; raises CredentialRejected on the first failure."""
        token = self._token(credential)
        assert self.keys is not None
        try:
            claims = await verify_with_source(token, self.keys, issuer=self.issuer, audience=self.audience,
                                              algorithms=SIDECAR_ALGORITHMS, leeway=self.leeway_seconds)
        except TokenError as error:
            raise CredentialRejected(error.reason, error.detail) from None
        check_binding(claims, method, target_uri, body)
        if self.introspect_url:
            await self._introspect(token)
        await self._refuse_replay(claims)
        return _verified(claims)

    async def _refuse_replay(self, claims: dict[str, Any]) -> None:
        """Last, so that only a credential that passed every other check uses up its jti."""
        if self.replay_cache is None:
            return
        jti, exp = claims.get("jti"), claims.get("exp")
        if not isinstance(jti, str) or not jti or not isinstance(exp, (int, float)):
            raise CredentialRejected("unbound", "the credential has no jti or exp to check for reuse")
        if not await self.replay_cache.first_use(jti, float(exp) + self.leeway_seconds):
            raise CredentialRejected("replayed", "this credential was already used; each one is good for one call")

    async def _introspect(self, token: str) -> None:
        assert self.introspect_url is not None
        headers = {"Authorization": f"Bearer {self.introspect_token}"} if self.introspect_token else {}
        try:
            async with httpx.AsyncClient(timeout=5.0) as client:
                response = await client.post(self.introspect_url, data={"token": token}, headers=headers)
            answer = response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            answer = None
        if not isinstance(answer, dict):
            raise CredentialRejected("introspection_unavailable", "the sidecar could not confirm the credential", 503)
        if answer.get("active") is not True:
            raise CredentialRejected("revoked", "the credential is no longer active (revoked, expired or unknown)")


def check_binding(claims: dict[str, Any], method: str, target_uri: str, body: bytes) -> None:
    """The token was minted for this method, this target and this body; nothing else."""
    bound = claims.get("req")
    if not isinstance(bound, dict):
        raise CredentialRejected("unbound", "the credential is not bound to a request")
    body_sha256 = hashlib.sha256(body).hexdigest()
    for name, actual in (("method", method.upper()), ("uri", target_uri), ("body_sha256", body_sha256)):
        if bound.get(name) != actual:
            raise CredentialRejected("wrong_request", f"the credential was minted for another request ({name} differs)", 403)
    expected = request_binding(method, target_uri, body_sha256)
    if not hmac.compare_digest(str(claims.get("req_hash", "")), expected):
        raise CredentialRejected("wrong_request", "the request hash does not match", 403)


def _verified(claims: dict[str, Any]) -> VerifiedCall:
    scope = claims.get("scope")
    return VerifiedCall(
        claims=claims, subject=str(claims.get("sub", "")),
        scopes=tuple(scope.split()) if isinstance(scope, str) else (),
        jti=str(claims.get("jti", "")), task_id=claims.get("task_id"), decision_id=claims.get("decision_id"),
        approval_id=claims.get("approval_id"), delegation=claims.get("act"),
    )


# ---------------------------------------------------------------- aiohttp

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
AGENT_CALL: web.RequestKey[VerifiedCall] = web.RequestKey("agent_call", VerifiedCall)


def aiohttp_middleware(verifier: ToolVerifier) -> Any:
    """Rejects unverified calls with 401/403 problem+json; the VerifiedCall is at request[AGENT_CALL]."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.content_length is not None and request.content_length > verifier.max_body_bytes:
            return _aiohttp_problem(CredentialRejected("body_too_large", "body exceeds the verifier's limit", 413))
        body = await request.read()  # cached by aiohttp: the handler can still read it
        origin = verifier.public_origin or f"{request.scheme}://{request.host}"
        try:
            request[AGENT_CALL] = await verifier.verify(
                credential=_single(request.headers.getall(verifier.header, [])), method=request.method,
                target_uri=origin + request.raw_path, body=body)
        except CredentialRejected as rejected:
            return _aiohttp_problem(rejected)
        return await handler(request)

    return middleware


def _single(values: list[str]) -> str | None:
    return values[0] if len(values) == 1 else None  # absent or ambiguous: both are a missing credential


def _aiohttp_problem(rejected: CredentialRejected) -> web.Response:
    return web.Response(status=rejected.status, body=json.dumps(rejected.problem()).encode(),
                        content_type="application/problem+json")


# ---------------------------------------------------------------- ASGI

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class VerifierASGIMiddleware:
    """Wraps any ASGI app (Starlette, FastAPI, ...); the VerifiedCall is at scope["state"]["agent_call"]."""

    def __init__(self, app: ASGIApp, verifier: ToolVerifier) -> None:
        self.app = app
        self.verifier = verifier

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            body = await self._body(receive)
            call = await self.verifier.verify(credential=_asgi_header(scope, self.verifier.header),
                                              method=scope["method"], target_uri=self._target(scope), body=body)
        except CredentialRejected as rejected:
            await _asgi_problem(send, rejected)
            return
        scope.setdefault("state", {})["agent_call"] = call
        await self.app(scope, _replay(body, receive), send)

    async def _body(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise CredentialRejected("bad_request", "the client went away", 400)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.verifier.max_body_bytes:
                raise CredentialRejected("body_too_large", "body exceeds the verifier's limit", 413)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _target(self, scope: Scope) -> str:
        raw_path = scope.get("raw_path") or scope["path"].encode()
        path: str = raw_path.decode("latin-1")
        query: str = scope.get("query_string", b"").decode("latin-1")
        if self.verifier.public_origin:
            origin = self.verifier.public_origin
        else:
            host = _asgi_header(scope, "host") or _server_authority(scope)
            origin = f"{scope.get('scheme', 'http')}://{host}"
        return origin + path + (f"?{query}" if query else "")


def _server_authority(scope: Scope) -> str:
    server = scope.get("server") or ("localhost", 80)
    return f"{server[0]}:{server[1]}"


def _asgi_header(scope: Scope, name: str) -> str | None:
    wanted = name.lower().encode()
    values = [v for k, v in scope.get("headers", []) if k.lower() == wanted]
    if len(values) != 1:
        return None  # absent or ambiguous: both are a missing credential
    value: bytes = values[0]
    return value.decode("latin-1")


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _asgi_problem(send: Send, rejected: CredentialRejected) -> None:
    body = json.dumps(rejected.problem()).encode()
    await send({"type": "http.response.start", "status": rejected.status,
                "headers": [(b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def verify_request(verifier: ToolVerifier, *, credential: str | None, method: str, target_uri: str,
                         body: bytes) -> VerifiedCall:
    """The plain function form, for frameworks without middleware."""
    return await verifier.verify(credential=credential, method=method, target_uri=target_uri, body=body)
