"""RFC 7662 token introspection for the credentials this sidecar minted, and who may ask."""

from __future__ import annotations

import hmac
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..secret import Secret
from ..tasks import TaskStore
from .keys import KeyRing
from .verify import SIDECAR_ALGORITHMS, TokenError, verify_jwt

INACTIVE: dict[str, Any] = {"active": False}
ANSWERED_CLAIMS = ("scope", "sub", "aud", "iss", "exp", "iat", "nbf", "jti", "task_id", "decision_id", "approval_id", "act")


class IntrospectionCallers:
    """The bearer tokens allowed to call /introspect: inline from config and/or a file re-read on change."""

    def __init__(self, tokens: Sequence[Secret] = (), tokens_file: Path | None = None) -> None:
        self._inline = tuple(tokens)
        self.tokens_file = tokens_file
        self._file_stamp: tuple[int, int] | None = None
        self._file_tokens: tuple[Secret, ...] = ()

    def _from_file(self) -> tuple[Secret, ...]:
        if self.tokens_file is None:
            return ()
        try:
            stat = self.tokens_file.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp != self._file_stamp:
                lines = self.tokens_file.read_text(encoding="utf-8").splitlines()
                self._file_tokens = tuple(Secret(line.strip()) for line in lines if len(line.strip()) >= 16)
                self._file_stamp = stamp
        except (OSError, UnicodeError):
            self._file_tokens, self._file_stamp = (), None  # unreadable: nobody is let in
        return self._file_tokens

    def allows(self, authorization: str | None) -> bool:
        if not authorization or authorization[:7].lower() != "bearer ":
            return False
        presented = authorization[7:].strip().encode()
        matched = False
        for token in (*self._inline, *self._from_file()):
            # Compare against every token so the time taken does not say which one nearly matched.
            matched |= hmac.compare_digest(presented, token.reveal().encode())
        return matched


class Introspector:
    def __init__(self, keys: KeyRing, tasks: TaskStore, *, issuer: str) -> None:
        self.keys = keys
        self.tasks = tasks
        self.issuer = issuer

    async def introspect(self, token: str) -> dict[str, Any]:
        """active=false for anything not signed by a loaded key, expired, unknown to the store or revoked."""
        try:
            claims = verify_jwt(token, self.keys.jwks(), issuer=self.issuer, audience=None, algorithms=SIDECAR_ALGORITHMS)
        except TokenError:
            return dict(INACTIVE)
        jti = claims.get("jti")
        if not isinstance(jti, str):
            return dict(INACTIVE)
        state = await self.tasks.credential(jti)
        if state is None or state.revoked:
            return dict(INACTIVE)
        task_id = claims.get("task_id")
        if task_id is not None:
            found = await self.tasks.get(str(task_id))
            if found is None or not found[0].active(time.time()):
                return dict(INACTIVE)
        answer: dict[str, Any] = {"active": True, "token_type": "Bearer"}
        answer.update({name: claims[name] for name in ANSWERED_CLAIMS if name in claims})
        return answer
