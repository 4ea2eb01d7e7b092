"""Step 5, mint: a fresh JWT for exactly one call, bound to its request, task and decision."""

from __future__ import annotations

import hashlib
import secrets
import time
from pathlib import Path
from typing import Any, Protocol

import jwt

from ..documents import Decision, InterceptedCall, MintedCredential
from ..secret import Secret
from .keys import KeyRing


def request_binding(method: str, target_uri: str, body_sha256: str) -> str:
    """The hash that binds a credential to one request; tools recompute it to check."""
    return hashlib.sha256(f"{method.upper()}\n{target_uri}\n{body_sha256}".encode()).hexdigest()


class CredentialMinter(Protocol):
    def mint(
        self, call: InterceptedCall, decision: Decision, *, subject: str,
        task: dict[str, Any] | None, delegation: list[dict[str, Any]], approval_id: str | None,
    ) -> MintedCredential: ...


class NoCredentialMinter:
    """For routes with credential mode none: nothing is injected."""

    def mint(self, call: InterceptedCall, decision: Decision, *, subject: str,
             task: dict[str, Any] | None, delegation: list[dict[str, Any]], approval_id: str | None) -> MintedCredential:
        return MintedCredential(header="", value=Secret(""), jti=None, expires_at=None)


def act_claim(delegation: list[dict[str, Any]]) -> dict[str, Any] | None:
    """RFC 8693 section 4.1: the most recent actor outermost, earlier actors nested."""
    act: dict[str, Any] | None = None
    for link in delegation:
        subject = link.get("sub")
        if not isinstance(subject, str):
            continue
        act = {"sub": subject, **({"act": act} if act else {})}
    return act


class JwtMinter:
    def __init__(self, keys: KeyRing, *, issuer: str, max_ttl_seconds: int, default_ttl_seconds: int) -> None:
        self.keys = keys
        self.issuer = issuer
        self.max_ttl_seconds = max_ttl_seconds
        self.default_ttl_seconds = default_ttl_seconds

    def claims(self, call: InterceptedCall, decision: Decision, *, subject: str,
               task: dict[str, Any] | None, delegation: list[dict[str, Any]], approval_id: str | None,
               now: int) -> dict[str, Any]:
        ttl = min(decision.credential.ttl_seconds or self.default_ttl_seconds, self.max_ttl_seconds)
        expires = now + ttl
        task_expiry = task.get("expires_at_epoch") if task else None
        if isinstance(task_expiry, int):
            expires = min(expires, task_expiry)
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": subject,
            "aud": decision.credential.audience or call.route.name,
            "scope": " ".join(decision.credential.scopes),
            "iat": now,
            "nbf": now,
            "exp": expires,
            "jti": secrets.token_hex(16),
            "decision_id": decision.decision_id,
            "req": {"method": call.method, "uri": call.target_url, "body_sha256": call.body_sha256},
            "req_hash": request_binding(call.method, call.target_url, call.body_sha256),
        }
        if task:
            claims["task_id"] = task["id"]
        if approval_id:
            claims["approval_id"] = approval_id
        act = act_claim(delegation)
        if act:
            claims["act"] = act
        return claims

    def mint(self, call: InterceptedCall, decision: Decision, *, subject: str,
             task: dict[str, Any] | None, delegation: list[dict[str, Any]], approval_id: str | None) -> MintedCredential:
        key = self.keys.current
        claims = self.claims(call, decision, subject=subject, task=task, delegation=delegation,
                             approval_id=approval_id, now=int(time.time()))
        token = jwt.encode(claims, key.private_key, algorithm=key.algorithm, headers={"kid": key.kid, "typ": "JWT"})
        header = call.route.credential.header
        scheme = call.route.credential.scheme
        return MintedCredential(
            header=header,
            value=Secret(f"{scheme} {token}" if scheme else token),
            jti=claims["jti"],
            expires_at=claims["exp"],
            kid=key.kid,
        )


class StaticKeyMinter:
    """Routes whose tool takes only a fixed API key: the key comes from a file only the sidecar reads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cached: tuple[int, Secret] | None = None

    def _key(self) -> Secret:
        mtime = self.path.stat().st_mtime_ns
        if self._cached is None or self._cached[0] != mtime:
            self._cached = (mtime, Secret(self.path.read_text(encoding="utf-8").strip()))
        return self._cached[1]

    def mint(self, call: InterceptedCall, decision: Decision, *, subject: str,
             task: dict[str, Any] | None, delegation: list[dict[str, Any]], approval_id: str | None) -> MintedCredential:
        scheme = call.route.credential.scheme
        key = self._key().reveal()
        return MintedCredential(header=call.route.credential.header,
                                value=Secret(f"{scheme} {key}" if scheme else key), jti=None, expires_at=None)
