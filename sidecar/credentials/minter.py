"""Step 5, mint: a fresh JWT for exactly one call, bound to its request, task and decision."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from ..documents import Decision, InterceptedCall, MintedCredential
from ..ids import random_hex
from ..secret import Secret
from .keys import KeyRing, SigningKey


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


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def jws_header(key: SigningKey) -> bytes:
    """The encoded protected header, as PyJWT writes it (sorted keys, no whitespace)."""
    header = {"alg": key.algorithm, "kid": key.kid, "typ": "JWT"}
    return _b64(json.dumps(header, separators=(",", ":"), sort_keys=True).encode())


def jws_signature(key: SigningKey, signing_input: bytes) -> bytes:
    """RFC 7518 section 3.4 for ES256: r and s as 32-byte big-endian integers, not DER."""
    private = key.private_key
    if isinstance(private, ec.EllipticCurvePrivateKey):
        r, s = decode_dss_signature(private.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return private.sign(signing_input)


def encode_jwt(key: SigningKey, header: bytes, claims: dict[str, Any]) -> str:
    """A compact JWS; the same bytes PyJWT's encode produces, without its per-call key checks (~30 µs)."""
    signing_input = header + b"." + _b64(json.dumps(claims, separators=(",", ":")).encode())
    return (signing_input + b"." + _b64(jws_signature(key, signing_input))).decode()


class JwtMinter:
    def __init__(self, keys: KeyRing, *, issuer: str, max_ttl_seconds: int, default_ttl_seconds: int) -> None:
        self.keys = keys
        self.issuer = issuer
        self.max_ttl_seconds = max_ttl_seconds
        self.default_ttl_seconds = default_ttl_seconds
        self._headers: dict[str, bytes] = {}  # by kid

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
            "jti": random_hex(16),
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
        header = self._headers.get(key.kid)
        if header is None:
            header = self._headers[key.kid] = jws_header(key)
        token = encode_jwt(key, header, claims)
        scheme = call.route.credential.scheme
        return MintedCredential(
            header=call.route.credential.header,
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
