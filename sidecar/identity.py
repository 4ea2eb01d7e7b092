"""Workload identity from a token file: a Kubernetes projected service-account token or a SPIFFE JWT-SVID.

The file is watched (stat every ``interval`` seconds, re-read when it changes)
and the token verified against the configured JWKS: signature, exp, aud and,
when configured, iss. Its ``sub`` is the agent's identity. While no valid
token is held, every call is refused with ``identity_unavailable`` and the
readiness check is red.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from .context import AgentIdentity
from .credentials.jwks import KeySource, verify_with_source
from .credentials.verify import WORKLOAD_ALGORITHMS, TokenError
from .problems import Refusal
from .secret import Secret

log = logging.getLogger("sidecar.identity")

MAX_TOKEN_FILE_BYTES = 16 * 1024


class TokenFileIdentity:
    def __init__(self, path: Path, keys: KeySource, *, audience: str, issuer: str | None = None,
                 leeway_seconds: float = 30.0) -> None:
        self.path = path
        self.keys = keys
        self.audience = audience
        self.issuer = issuer
        self.leeway_seconds = leeway_seconds
        self._identity: AgentIdentity | None = None
        self._expires_at = 0.0
        self._stamp: tuple[int, int] | None = None
        self._problem = "identity token not loaded yet"

    def current(self) -> AgentIdentity:
        identity = self._identity
        if identity is None or time.time() >= self._expires_at:
            raise Refusal("identity_unavailable", f"no valid workload identity: {self.problem}")
        return identity

    @property
    def problem(self) -> str:
        if self._identity is not None and time.time() >= self._expires_at:
            return "the identity token has expired and no fresh one was projected"
        return self._problem

    async def ready(self) -> tuple[bool, str]:
        try:
            identity = self.current()
        except Refusal:
            return False, self.problem
        return True, f"{identity.id} (expires in {int(self._expires_at - time.time())}s)"

    def _read(self) -> tuple[tuple[int, int], Secret]:
        stat = self.path.stat()
        if stat.st_size > MAX_TOKEN_FILE_BYTES:
            raise OSError(f"larger than {MAX_TOKEN_FILE_BYTES} bytes")
        return (stat.st_mtime_ns, stat.st_size), Secret(self.path.read_text(encoding="ascii").strip())

    async def refresh(self) -> None:
        """Re-read and re-verify when the file changed, or when the last attempt failed."""
        try:
            stat = await asyncio.to_thread(self.path.stat)
        except OSError as exc:
            self._fail(f"{self.path}: cannot read ({exc.strerror})")
            return
        if (stat.st_mtime_ns, stat.st_size) == self._stamp and self._identity is not None:
            return
        try:
            stamp, token = await asyncio.to_thread(self._read)
        except (OSError, UnicodeError) as exc:
            self._fail(f"{self.path}: cannot read ({getattr(exc, 'strerror', None) or type(exc).__name__})")
            return
        self._stamp = stamp
        await self._verify(token)

    async def _verify(self, token: Secret) -> None:
        try:
            claims = await verify_with_source(token.reveal(), self.keys, issuer=self.issuer, audience=self.audience,
                                              algorithms=WORKLOAD_ALGORITHMS, leeway=self.leeway_seconds)
        except TokenError as error:
            self._fail(f"{self.path}: identity token refused ({error.reason}: {error.detail})")
            return
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject or len(subject) > 512:
            self._fail(f"{self.path}: identity token has no usable sub claim")
            return
        if self._identity is None or self._identity.id != subject:
            log.info("workload identity is now %s", subject)
        self._identity = AgentIdentity(subject, verified=True)
        self._expires_at = float(claims["exp"])
        self._problem = ""

    def _fail(self, problem: str) -> None:
        if problem != self._problem:
            log.warning("workload identity unavailable: %s", problem)
        self._identity, self._stamp, self._problem = None, None, problem

    async def watch(self, interval: float = 1.0) -> None:
        """Runs for the life of the sidecar."""
        while True:
            await self.refresh()
            await asyncio.sleep(interval)
