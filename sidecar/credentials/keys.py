"""Signing keys from a directory of PEM files; kid is the RFC 7638 JWK thumbprint."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

log = logging.getLogger("sidecar.keys")

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


class KeyError_(Exception):
    """A key directory or key file that cannot be used; names the path."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_jwk(key: PrivateKey) -> dict[str, str]:
    """The public half as a JWK with only the members RFC 7638 hashes."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"crv": "Ed25519", "kty": "OKP", "x": _b64(raw)}
    numbers = key.public_key().public_numbers()
    return {"crv": "P-256", "kty": "EC", "x": _b64(numbers.x.to_bytes(32, "big")), "y": _b64(numbers.y.to_bytes(32, "big"))}


def thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638: SHA-256 over the required members, sorted, no whitespace."""
    canonical = json.dumps(jwk, sort_keys=True, separators=(",", ":")).encode()
    return _b64(hashlib.sha256(canonical).digest())


@dataclass(frozen=True)
class SigningKey:
    kid: str
    algorithm: str  # ES256 | EdDSA
    private_key: PrivateKey
    path: Path
    mtime_ns: int

    def __repr__(self) -> str:
        return f"SigningKey(kid={self.kid!r}, algorithm={self.algorithm!r}, path={str(self.path)!r})"

    def jwk(self) -> dict[str, str]:
        jwk = public_jwk(self.private_key)
        return {**jwk, "kid": self.kid, "alg": self.algorithm, "use": "sig"}


def load_key(path: Path) -> SigningKey:
    try:
        data = path.read_bytes()
        key = serialization.load_pem_private_key(data, password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise KeyError_(f"{path}: not a readable unencrypted PEM private key ({type(exc).__name__})") from None
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        algorithm = "ES256"
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        algorithm = "EdDSA"
    else:
        raise KeyError_(f"{path}: only P-256 (ES256) and Ed25519 (EdDSA) keys are supported")
    return SigningKey(thumbprint(public_jwk(key)), algorithm, key, path, path.stat().st_mtime_ns)


def generate_key(directory: Path, algorithm: str = "ES256") -> SigningKey:
    """Write a new private key, readable by its owner only, named by its kid."""
    directory.mkdir(parents=True, exist_ok=True)
    key: PrivateKey = ec.generate_private_key(ec.SECP256R1()) if algorithm == "ES256" else ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    kid = thumbprint(public_jwk(key))
    # A sortable name: where a volume gives every file the same mtime (Kubernetes Secrets), the greatest name signs.
    path = directory / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{kid[:12]}.pem"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    return load_key(path)


class KeyRing:
    """The keys of one directory. The newest key (mtime, then file name) signs; every key verifies."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._keys: dict[str, SigningKey] = {}
        self._signature: tuple[tuple[str, int], ...] = ()
        self._jwks: dict[str, Any] = {"keys": []}
        self._current: SigningKey | None = None
        self.problem = ""
        self.reload()
        if not self._keys:
            raise KeyError_(f"{directory}: no signing keys (*.pem)")

    def _scan(self) -> tuple[tuple[str, int], ...]:
        try:
            entries = sorted(self.directory.glob("*.pem"))
            return tuple((p.name, p.stat().st_mtime_ns) for p in entries)
        except OSError as exc:
            raise KeyError_(f"{self.directory}: cannot read key directory ({exc.strerror})") from None

    def reload(self) -> bool:
        """Re-read the directory if it changed; return whether the key set changed."""
        if not self.directory.is_dir():
            raise KeyError_(f"{self.directory}: key directory does not exist")
        signature = self._scan()
        if signature == self._signature:
            return False
        keys = {}
        for name, _ in signature:
            key = load_key(self.directory / name)
            keys[key.kid] = key
        if not keys:
            raise KeyError_(f"{self.directory}: no signing keys (*.pem)")
        jwks = {"keys": [key.jwk() for key in sorted(keys.values(), key=lambda k: k.kid)]}
        current = max(keys.values(), key=lambda k: (k.mtime_ns, k.path.name))
        # One tuple assignment each: readers on the event loop never see a half-updated ring.
        self._keys, self._signature, self._jwks, self._current = keys, signature, jwks, current
        return True

    @property
    def current(self) -> SigningKey:
        assert self._current is not None
        return self._current

    def get(self, kid: str) -> SigningKey | None:
        return self._keys.get(kid)

    def jwks(self) -> dict[str, Any]:
        return self._jwks

    async def watch(self, interval: float = 1.0) -> None:
        """Re-scan the directory every ``interval`` seconds for the life of the sidecar (in a thread: file IO)."""
        while True:
            await asyncio.sleep(interval)
            try:
                if await asyncio.to_thread(self.reload):
                    log.info("signing keys reloaded: %d loaded, %s signs", len(self._keys), self.current.kid)
                self.problem = ""
            except KeyError_ as exc:
                if str(exc) != self.problem:
                    log.error("signing keys not reloaded, the previous set stays in use: %s", exc)
                self.problem = str(exc)

    async def ready(self) -> tuple[bool, str]:
        if self.problem:
            return False, self.problem
        return True, f"{len(self._keys)} key(s), {self.current.kid} signs"
