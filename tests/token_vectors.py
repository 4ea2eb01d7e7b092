"""Test issuers and the refusal vectors of tests/vectors/tokens/refusals.json.

Keys are generated here at run time (never committed). Reusable by every test
that checks a place where the sidecar verifies a token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from sidecar.credentials.keys import public_jwk, thumbprint

VECTORS = Path(__file__).resolve().parent / "vectors" / "tokens" / "refusals.json"
TIME_CLAIMS = ("exp", "iat", "nbf")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _rsa_jwk(key: rsa.RSAPrivateKey) -> dict[str, str]:
    numbers = key.public_key().public_numbers()
    return {"e": b64(numbers.e.to_bytes(3, "big")), "kty": "RSA",
            "n": b64(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big"))}


@dataclass
class Issuer:
    """A signing key with a kid, as a Kubernetes API server, a SPIRE server or a parent sidecar would hold."""

    algorithm: str = "ES256"
    kid: str = ""
    key: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.key is None:
            if self.algorithm == "RS256":
                self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            elif self.algorithm == "EdDSA":
                self.key = ed25519.Ed25519PrivateKey.generate()
            else:
                self.key = ec.generate_private_key(ec.SECP256R1())
        if not self.kid:
            self.kid = thumbprint(self.public_jwk())

    def public_jwk(self) -> dict[str, str]:
        if self.algorithm == "RS256":
            return _rsa_jwk(self.key)
        return public_jwk(self.key)

    def jwks(self) -> dict[str, Any]:
        return {"keys": [{**self.public_jwk(), "kid": self.kid, "alg": self.algorithm, "use": "sig"}]}

    def public_pem(self) -> bytes:
        return bytes(self.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo))

    def sign(self, claims: dict[str, Any], header: dict[str, Any] | None = None) -> str:
        headers = {"kid": self.kid, **(header or {})}
        return jwt.encode(claims, self.key, algorithm=self.algorithm, headers=headers)


def claims_for(*, sub: str, iss: str, aud: str, ttl: int = 300, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": sub, "iss": iss, "aud": aud, "iat": now, "nbf": now, "exp": now + ttl, **extra}


def _raw(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())


def _case_claims(valid: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    now = int(time.time())
    claims = dict(valid)
    for name, value in overrides.items():
        claims[name] = now + value if name in TIME_CLAIMS else value
    return claims


def refusal_tokens(trusted: Issuer, valid_claims: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(case name, token, expected TokenError reason) for every vector."""
    cases = json.loads(VECTORS.read_text())["cases"]
    made = []
    for case in cases:
        claims = _case_claims(valid_claims, case.get("claims", {}))
        header = {"typ": "JWT", "kid": trusted.kid, **case.get("header", {})}
        made.append((case["name"], _make(case["make"], trusted, header, claims), case["expect"]))
    return made


def _make(how: str, trusted: Issuer, header: dict[str, Any], claims: dict[str, Any]) -> str:
    if how == "unsigned":
        return _raw(header, claims) + "."
    if how == "hmac_with_public_pem":
        signing_input = _raw(header, claims)
        mac = hmac.new(trusted.public_pem(), signing_input.encode(), hashlib.sha256).digest()
        return signing_input + "." + b64(mac)
    if how == "foreign_key":
        return Issuer(trusted.algorithm, kid=trusted.kid).sign(claims, {k: v for k, v in header.items() if k != "alg"})
    if how == "tampered":
        genuine = trusted.sign(claims | {"sub": "genuine"}, {k: v for k, v in header.items() if k != "alg"})
        head, _, signature = genuine.split(".")
        return head + "." + b64(json.dumps(claims).encode()) + "." + signature
    return trusted.sign(claims, {k: v for k, v in header.items() if k != "alg"})
