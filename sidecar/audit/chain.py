"""A hash-chained JSON-lines audit log.

Each event is a JSON object with ``seq``, ``prev_hash`` and ``hash``, where
``hash`` is the SHA-256 of the event's canonical JSON without ``hash``. The
first event of a file carries the last hash of the file before it, so a
rotated set of files is one chain. Appends are one ``write`` of one line to
an O_APPEND descriptor: a few microseconds, no fsync on the request path.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

GENESIS = "0" * 64


class AuditError(Exception):
    """The audit sink could not record an event."""


class AuditSink(Protocol):
    def append(self, event: dict[str, Any]) -> dict[str, Any]:
        """Record an event; return it with its chain fields. Raise AuditError on failure."""
        ...

    def close(self) -> None: ...


def canonical(event: dict[str, Any]) -> bytes:
    return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def event_hash(event: dict[str, Any]) -> str:
    body = {k: v for k, v in event.items() if k != "hash"}
    return hashlib.sha256(canonical(body)).hexdigest()


def _last_event(path: Path) -> dict[str, Any] | None:
    """The last complete line of a file, read from its end."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            block = min(size, 1 << 20)
            handle.seek(size - block)
            lines = handle.read(block).splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        if line.strip():
            try:
                value = json.loads(line)
            except ValueError:
                raise AuditError(f"{path}: last line is not JSON; refusing to extend a broken chain") from None
            return value if isinstance(value, dict) else None
    return None


class HashChainLog:
    def __init__(self, path: Path, *, chain_id: str = "sidecar") -> None:
        self.path = path
        self.chain_id = chain_id
        path.parent.mkdir(parents=True, exist_ok=True)
        last = _last_event(path)
        self._prev = last["hash"] if last else GENESIS
        self._seq = int(last["seq"]) + 1 if last else 0
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._lock = threading.Lock()
        self.failures = 0

    @property
    def last_hash(self) -> str:
        return self._prev

    def append(self, event: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            record = {"seq": self._seq, "timestamp": _now(), "chain": self.chain_id, **event, "prev_hash": self._prev}
            record["hash"] = event_hash(record)
            line = canonical(record) + b"\n"
            try:
                written = os.write(self._fd, line)
                if written != len(line):
                    raise OSError("short write")
            except OSError as exc:
                self.failures += 1
                raise AuditError(f"audit write failed: {exc}") from None
            self._prev = record["hash"]
            self._seq += 1
            return record

    def close(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass


def _now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    events: int
    problem: str | None = None


def verify_files(paths: list[Path]) -> VerifyResult:
    """Check every link of the chain across files in order; report the first break."""
    prev: str | None = None
    count = 0
    for path in paths:
        try:
            handle = path.open("rb")
        except OSError as exc:
            return VerifyResult(False, count, f"{path}: cannot read ({exc.strerror})")
        with handle:
            for number, line in enumerate(handle, start=1):
                where = f"{path}:{number}"
                try:
                    event = json.loads(line)
                except ValueError:
                    return VerifyResult(False, count, f"{where}: not JSON")
                if not isinstance(event, dict) or "hash" not in event or "prev_hash" not in event:
                    return VerifyResult(False, count, f"{where}: missing hash or prev_hash")
                if event_hash(event) != event["hash"]:
                    return VerifyResult(False, count, f"{where}: event was altered (hash mismatch)")
                if prev is not None and event["prev_hash"] != prev:
                    return VerifyResult(False, count, f"{where}: broken link (prev_hash does not match the previous event; an event is missing or out of order)")
                prev = event["hash"]
                count += 1
    return VerifyResult(True, count)
