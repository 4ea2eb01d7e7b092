"""Where a policy comes from, and which revision it is.

A source is polled (off the event loop, on a thread) and answers with a new ``LoadedPolicy`` when
what it serves changed since it was last asked, or None:

- ``DirectorySource``: a rego/ tree, re-read and hashed on every poll. Hashing the content, not
  watching mtimes, also catches Kubernetes' ConfigMap update (the ``..data`` symlink is swapped to a
  new timestamped directory, leaving every mtime the kubelet chose). Revision: ``sha256:<hex>``.
- ``BundleFileSource``: an OPA bundle (``.tar.gz``) on disk. Revision: the manifest's ``revision``.
- ``BundleUrlSource``: the same over HTTP(S), polled with ``If-None-Match`` as OPA's bundle plugin does.

A source remembers what it last served (good or bad), so a broken change is tried once, not on every
poll; a forced fetch (SIGHUP, ``POST /v1/policy/reload``) tries again regardless.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .loader import PolicyBundle, PolicyLoadError, content_revision, policy_from_files, read_policy_files

DEFAULT_BUNDLE_NAME = "authz"


@dataclass(frozen=True)
class LoadedPolicy:
    """A policy read from its source, not yet checked; ``name``/``revision`` as OPA's decision log has them."""

    bundle: PolicyBundle
    name: str
    revision: str
    origin: str  # the directory, file or URL it was read from

    @property
    def bundles(self) -> dict[str, str]:
        return {self.name: self.revision}


class PolicySource(Protocol):
    origin: str

    def fetch(self, *, force: bool = False) -> LoadedPolicy | None:
        """The policy when it changed since the last fetch (always when ``force``), else None.

        Blocking: call it on a thread. Raises PolicyLoadError, with ``revision`` set when known.
        """
        ...


class DirectorySource:
    """A directory; a change is taken once two polls in a row read the same content, so that a tree being
    written file by file (a git checkout, a copy) is never loaded half-way. A forced fetch takes it at once."""

    def __init__(self, root: Path, *, name: str = DEFAULT_BUNDLE_NAME) -> None:
        self.root = Path(root)
        self.name = name
        self.origin = str(self.root)
        self._seen: str | None = None
        self._settling: str | None = None  # a new content read once, taken if the next poll reads it again

    def fetch(self, *, force: bool = False) -> LoadedPolicy | None:
        files = read_policy_files(self.root)
        revision = content_revision(files)
        if revision == self._seen and not force:
            self._settling = None
            return None
        if revision != self._settling and not force:
            self._settling = revision
            return None
        self._seen = revision
        self._settling = None
        try:
            bundle = policy_from_files(self.root, files)
        except PolicyLoadError as exc:
            exc.revision = revision
            raise
        return LoadedPolicy(bundle, self.name, revision, self.origin)


class BundleFileSource:
    """An OPA bundle file; verified against ``public_key`` (PEM) when one is given."""

    def __init__(self, path: Path, *, name: str = DEFAULT_BUNDLE_NAME, public_key: bytes | None = None,
                 key_id: str | None = None) -> None:
        self.path = Path(path)
        self.name = name
        self.origin = str(self.path)
        self._public_key = public_key
        self._key_id = key_id
        self._seen: str | None = None

    def fetch(self, *, force: bool = False) -> LoadedPolicy | None:
        from .bundle import read_bundle

        try:
            content = self.path.read_bytes()
        except OSError as exc:
            raise PolicyLoadError(self.path, f"cannot read: {exc.strerror or exc}") from None
        digest = hashlib.sha256(content).hexdigest()
        if digest == self._seen and not force:
            return None
        self._seen = digest
        read = read_bundle(content, origin=self.path, public_key=self._public_key, key_id=self._key_id)
        return LoadedPolicy(read.policy, self.name, read.revision, self.origin)


class BundleUrlSource:
    """An OPA bundle served over HTTP(S), fetched with ``If-None-Match`` (a 304 means unchanged)."""

    def __init__(self, url: str, *, name: str = DEFAULT_BUNDLE_NAME, public_key: bytes | None = None,
                 key_id: str | None = None, timeout_seconds: float = 10.0, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.url = url
        self.name = name
        self.origin = url
        self._public_key = public_key
        self._key_id = key_id
        self._timeout = timeout_seconds
        self._max_bytes = max_bytes
        self._etag: str | None = None

    def fetch(self, *, force: bool = False) -> LoadedPolicy | None:
        import httpx

        from .bundle import read_bundle

        headers = {"Accept": "application/gzip, application/octet-stream"}
        if self._etag is not None and not force:
            headers["If-None-Match"] = self._etag
        try:
            # trust_env=False: a proxy variable in the sidecar's environment must never reroute its policy.
            with httpx.Client(timeout=self._timeout, trust_env=False, follow_redirects=False) as client:
                with client.stream("GET", self.url, headers=headers) as response:
                    if response.status_code == 304:
                        return None
                    if response.status_code != 200:
                        raise PolicyLoadError(self.url, f"bundle server answered HTTP {response.status_code}")
                    content = bytearray()
                    for chunk in response.iter_bytes():
                        content += chunk
                        if len(content) > self._max_bytes:
                            raise PolicyLoadError(self.url, f"bundle larger than {self._max_bytes} bytes")
                    etag = response.headers.get("ETag")
        except httpx.HTTPError as exc:
            raise PolicyLoadError(self.url, f"bundle server unreachable: {type(exc).__name__}") from None
        self._etag = etag  # a refused bundle is not fetched again until the server serves another
        read = read_bundle(bytes(content), origin=self.url, public_key=self._public_key, key_id=self._key_id)
        return LoadedPolicy(read.policy, self.name, read.revision, self.origin)
