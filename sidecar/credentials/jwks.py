"""Trusted key sets from a file or a URL, cached, refreshed on change and on an unknown kid."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from .verify import JwksUnavailable, KeySource, verify_with_source

__all__ = ["FileJwks", "JwksUnavailable", "KeySource", "StaticJwks", "UrlJwks", "key_source", "parse_jwks",
           "verify_with_source"]

MAX_JWKS_BYTES = 256 * 1024
MAX_KEYS = 100


def parse_jwks(data: bytes, where: str) -> dict[str, Any]:
    if len(data) > MAX_JWKS_BYTES:
        raise JwksUnavailable(f"{where}: key set larger than {MAX_JWKS_BYTES} bytes")
    try:
        document = json.loads(data)
    except ValueError:
        raise JwksUnavailable(f"{where}: not JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JwksUnavailable(f"{where}: not a JWK Set (no keys list)")
    if len(document["keys"]) > MAX_KEYS:
        raise JwksUnavailable(f"{where}: more than {MAX_KEYS} keys")
    return {"keys": [k for k in document["keys"] if isinstance(k, dict)]}


class FileJwks:
    """A JWK Set file, re-read when its modification time or size changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._keys: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return str(self.path)

    def _read(self) -> dict[str, Any]:
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            if self._keys is not None and stamp == self._stamp:
                return self._keys
            keys = parse_jwks(self.path.read_bytes(), str(self.path))
        except OSError as exc:
            raise JwksUnavailable(f"{self.path}: cannot read ({exc.strerror})") from None
        self._keys, self._stamp = keys, stamp
        return keys

    async def keys(self, *, force: bool = False) -> dict[str, Any]:
        return await asyncio.to_thread(self._read)


class UrlJwks:
    """A JWK Set over HTTP(S): cached for ``max_age`` seconds, refetched at most every ``min_refresh`` seconds."""

    def __init__(self, url: str, *, max_age: float = 300.0, min_refresh: float = 5.0, timeout: float = 5.0,
                 verify_tls: bool | str = True) -> None:
        self.url = url
        self.max_age = max_age
        self.min_refresh = min_refresh
        self.timeout = timeout
        self.verify_tls = verify_tls
        self._keys: dict[str, Any] | None = None
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()

    @property
    def name(self) -> str:
        return self.url

    async def keys(self, *, force: bool = False) -> dict[str, Any]:
        async with self._lock:
            age = time.monotonic() - self._fetched_at
            stale = self._keys is None or age >= self.max_age or (force and age >= self.min_refresh)
            if stale:
                try:
                    self._keys = await self._fetch()
                except JwksUnavailable:
                    if self._keys is None or age >= self.max_age:
                        raise
                self._fetched_at = time.monotonic()
            assert self._keys is not None
            return self._keys

    async def _fetch(self) -> dict[str, Any]:
        import httpx  # only a sidecar that verifies against a JWKS URL pays its memory

        try:
            async with httpx.AsyncClient(timeout=self.timeout, verify=self.verify_tls, follow_redirects=False) as client:
                response = await client.get(self.url, headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise JwksUnavailable(f"{self.url}: fetch failed ({type(exc).__name__})") from None
        if response.status_code != 200:
            raise JwksUnavailable(f"{self.url}: answered {response.status_code}")
        return parse_jwks(response.content, self.url)


class StaticJwks:
    """A key set held in memory (the sidecar's own keys, tests)."""

    def __init__(self, jwks: dict[str, Any], name: str = "static") -> None:
        self._jwks = jwks
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    async def keys(self, *, force: bool = False) -> dict[str, Any]:
        return self._jwks


def key_source(location: str, base: Path | None = None) -> KeySource:
    """``https://...`` or ``http://...`` is fetched; anything else is a file path."""
    if location.startswith(("http://", "https://")):
        return UrlJwks(location)
    path = Path(location)
    if not path.is_absolute() and base is not None:
        path = base / path
    return FileJwks(path)
