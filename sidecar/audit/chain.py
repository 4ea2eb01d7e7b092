"""A hash-chained JSON-lines audit log, rotated by size into files that form one chain.

Each event is a JSON object with ``seq``, ``prev_hash`` and ``hash``, where
``hash`` is the SHA-256 of the event's canonical JSON (sorted keys, no
whitespace) without ``hash``. The first event of the chain has an all-zero
``prev_hash``; the first event of a rotated file carries the last hash of the
file before it, so ``audit.000001.jsonl audit.000002.jsonl audit.jsonl`` verify
as one chain.

``HashChainLog`` is synchronous and is driven by one writer thread
(:mod:`sidecar.audit.writer`); it never runs on the event loop.

When the active file is removed or replaced under the running writer, the writer
keeps the chain whole: what the open (possibly deleted) file holds is copied into
the next rotated file unless that file is still part of the chain under another
name, a foreign regular file at the path is moved aside, and the chain continues
in a new active file whose first event links to the last hash written.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from ..jsoncodec import canonical

GENESIS = "0" * 64
DEFAULT_ROTATE_BYTES = 64 * 1024 * 1024


class AuditError(Exception):
    """The audit sink could not record an event."""


class AuditSink(Protocol):
    async def record(self, event: dict[str, Any]) -> dict[str, Any]:
        """Write an event and return it with its chain fields; raise AuditError when it was not written."""
        ...

    def append(self, event: dict[str, Any], *, receipt: bool = True) -> asyncio.Future[dict[str, Any] | None] | None:
        """Queue an event without waiting and return its receipt (see sidecar.audit.writer); none if not ``receipt``.

        Raise AuditError only when the event cannot even be queued; every lost event is counted by the sink.
        """
        ...

    def close(self) -> None: ...


def event_hash(event: dict[str, Any]) -> str:
    body = {k: v for k, v in event.items() if k != "hash"}
    return hashlib.sha256(canonical(body)).hexdigest()


def now_rfc3339() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"


# ---------------------------------------------------------------- files of one chain


def rotated_name(active: Path, number: int) -> Path:
    """``audit.jsonl`` -> ``audit.000001.jsonl``: sorts before the active file in a shell glob."""
    return active.with_name(f"{active.stem}.{number:06d}{active.suffix}")


def rotated_files(active: Path) -> list[Path]:
    pattern = re.compile(re.escape(active.stem) + r"\.(\d{6,})" + re.escape(active.suffix) + "$")
    found: list[tuple[int, Path]] = []
    if active.parent.is_dir():
        for candidate in active.parent.iterdir():
            match = pattern.match(candidate.name)
            if match:
                found.append((int(match[1]), candidate))
    return [path for _, path in sorted(found)]


def _next_rotated(active: Path) -> Path:
    existing = rotated_files(active)
    number = int(existing[-1].name[len(active.stem) + 1:].split(".")[0]) + 1 if existing else 1
    return rotated_name(active, number)


def chain_files(active: Path) -> list[Path]:
    """Every file of the chain whose active file is ``active``, oldest first."""
    files = rotated_files(active)
    if active.exists():
        files.append(active)
    return files


def expand(paths: list[Path]) -> list[Path]:
    """Command-line paths: a directory stands for the chain of its ``audit.jsonl``."""
    files: list[Path] = []
    for path in paths:
        files.extend(chain_files(path / "audit.jsonl") if path.is_dir() else [path])
    return files


def _last_event(path: Path) -> dict[str, Any] | None:
    """The last complete line of a file, read from its end, however long it is (a decision event embeds its
    call's body: a line can pass a mebibyte)."""
    try:
        with path.open("rb") as handle:
            line = _last_line(handle)
    except FileNotFoundError:
        return None
    if not line:
        return None
    try:
        value = json.loads(line)
    except ValueError:
        raise AuditError(f"{path}: last line is not JSON; refusing to extend a broken chain") from None
    return value if isinstance(value, dict) else None


def _last_line(handle: BinaryIO) -> bytes:
    """Blocks read backwards, each twice the last, until the line before the last non-blank one begins."""
    position = handle.seek(0, os.SEEK_END)
    tail, block = b"", 1 << 16
    while position > 0:
        step = min(block, position)
        position -= step
        handle.seek(position)
        tail = handle.read(step) + tail
        content = tail.rstrip()
        start = content.rfind(b"\n")
        if start >= 0:
            return content[start + 1:]
        block *= 2
    return tail.strip()


def chain_tail(active: Path) -> dict[str, Any] | None:
    """The last event of the chain: in the active file, or in the newest rotated file if the active one is empty."""
    for path in reversed(chain_files(active)):
        last = _last_event(path)
        if last is not None:
            return last
    return None


# ---------------------------------------------------------------- the writer's log


class HashChainLog:
    """Appends batches of events to the active file; rotates it past ``rotate_bytes`` (0: never).

    A batch is one ``write`` to an O_APPEND descriptor. A failed or short write is
    cut back off the file and the chain state is not advanced, so the file never
    holds half a line and the next event links to the last one really written.
    """

    def __init__(self, path: Path, *, chain_id: str = "sidecar", rotate_bytes: int = DEFAULT_ROTATE_BYTES) -> None:
        self.path = path
        self.chain_id = chain_id
        self.rotate_bytes = rotate_bytes
        path.parent.mkdir(parents=True, exist_ok=True)
        last = chain_tail(path)
        self._prev = str(last["hash"]) if last else GENESIS
        self._seq = int(last["seq"]) + 1 if last else 0
        self._fd = -1
        self._size = 0
        self._identity: tuple[int, int] | None = None
        self._notices: list[dict[str, Any]] = []  # events about the chain itself, written before the next events
        self.notices_written: list[dict[str, Any]] = []  # those the last write_batch wrote, with their chain fields
        self.on_displaced: Callable[[str, dict[str, Any]], None] = lambda what, notice: None
        self._open()

    @property
    def last_hash(self) -> str:
        return self._prev

    @property
    def next_seq(self) -> int:
        return self._seq

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        opened = os.fstat(self._fd)
        self._size = opened.st_size
        self._identity = (opened.st_dev, opened.st_ino)

    def _close_fd(self) -> None:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
        self._fd = -1

    def _ensure_open(self) -> None:
        """Reopen after a failure (a displaced file is dealt with first: see continue_after_displacement)."""
        if self._fd < 0:
            self._open()

    def displaced(self) -> str | None:
        """``removed`` or ``replaced`` when the path no longer names the file being written; else None."""
        if self._fd < 0 or self._identity is None:
            return None
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            return "removed"
        except OSError:
            return "replaced"  # e.g. a parent directory replaced by a file
        return None if (current.st_dev, current.st_ino) == self._identity else "replaced"

    def _continue_if_displaced(self) -> None:
        what = self.displaced()
        if what is None:
            return
        try:
            notice = self.continue_after_displacement(what)
        except OSError as exc:
            raise AuditError(f"audit file {what} and its events could not be kept: {exc.strerror or exc}") from None
        self._notices.append(notice)
        self.on_displaced(what, notice)

    def continue_after_displacement(self, what: str) -> dict[str, Any]:
        """Keep the displaced file's events in the chain and let the next write start a new active file.

        Returns the event that opens the new segment. Raises OSError, with nothing changed, when the
        events cannot be kept (the next write tries again).
        """
        recovered = self._recover_open_file()
        moved_aside = self._move_foreign_file_aside() if what == "replaced" else None
        self._close_fd()
        self._identity = None
        return {"type": "audit.segment_started", "reason": f"audit file {what} under the running sidecar",
                "recovered_into": recovered, "moved_aside": moved_aside, "continues_after_seq": self._seq - 1}

    def _recover_open_file(self) -> str | None:
        """Copy the open file's content (readable through /proc even once deleted) into the next rotated file."""
        opened = os.fstat(self._fd)
        if not stat.S_ISREG(opened.st_mode) or opened.st_size == 0 or self._in_chain(opened):
            return None
        target = _next_rotated(self.path)
        with open(f"/proc/self/fd/{self._fd}", "rb") as source, open(target, "xb") as copy:
            shutil.copyfileobj(source, copy)
            copy.flush()
            os.fsync(copy.fileno())
        return target.name

    def _in_chain(self, opened: os.stat_result) -> bool:
        """Renamed to a rotated name (by a log rotator): still part of the chain, nothing to copy."""
        for path in rotated_files(self.path):
            try:
                found = os.stat(path)
            except OSError:
                continue
            if (found.st_dev, found.st_ino) == (opened.st_dev, opened.st_ino):
                return True
        return False

    def _move_foreign_file_aside(self) -> str | None:
        """A regular file that is not ours took the path: keep it, out of the chain. Anything else stays for the operator."""
        try:
            found = os.lstat(self.path)
        except OSError:
            return None
        if not stat.S_ISREG(found.st_mode):
            return None
        aside = self.path.with_name(f"{self.path.name}.foreign-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
        os.rename(self.path, aside)
        return aside.name

    def _rotate(self) -> None:
        os.fsync(self._fd)
        target = _next_rotated(self.path)
        self._close_fd()
        os.rename(self.path, target)
        self._open()

    def chain(self, events: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], bytes]:
        """The events with their chain fields, and their lines; the log's state is unchanged."""
        prev, seq = self._prev, self._seq
        records: list[dict[str, Any]] = []
        lines: list[bytes] = []
        for event in events:
            record = {"seq": seq, "chain": self.chain_id, **event, "prev_hash": prev}
            record.pop("hash", None)
            record.setdefault("timestamp", now_rfc3339())
            # One serialisation per event: the hash covers the canonical body, and the line is that
            # body with "hash" appended (verifiers re-canonicalise, so key order on disk is free).
            try:
                body = canonical(record)
            except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
                record = _unencodable(record, exc)
                body = canonical(record)
            record["hash"] = prev = hashlib.sha256(body).hexdigest()
            records.append(record)
            lines.append(body[:-1] + b',"hash":"' + prev.encode() + b'"}\n')
            seq += 1
        return records, b"".join(lines)

    def write_batch(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Write events in order as one write; raise AuditError and write nothing on failure.

        A displaced file is dealt with first; the ``audit.segment_started`` event that says so goes
        before the events, and is left in ``notices_written``.
        """
        self.notices_written = []
        self._continue_if_displaced()
        notices = self._notices
        if not notices and not events:
            return []
        records, data = self.chain(notices + events)
        try:
            self._ensure_open()
            if self.rotate_bytes and self._size > 0 and self._size + len(data) > self.rotate_bytes:
                self._rotate()
            self._write_all(data)
        except OSError as exc:
            self._close_fd()
            raise AuditError(f"audit write failed: {exc.strerror or exc}") from None
        self._prev = records[-1]["hash"]
        self._seq += len(records)
        self._notices, self.notices_written = [], records[:len(notices)]
        return records[len(notices):]

    def _write_all(self, data: bytes) -> None:
        before = self._size
        try:
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(0, "short write")
        except OSError:
            try:
                os.ftruncate(self._fd, before)  # never leave half a line behind
            except OSError:
                pass
            raise
        self._size = before + written

    def append(self, event: dict[str, Any]) -> dict[str, Any]:
        """Synchronous single-event write (tools and tests; the sidecar goes through AuditWriter)."""
        return self.write_batch([event])[0]

    def close(self) -> None:
        self._close_fd()


# ---------------------------------------------------------------- reading and verifying


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    events: int
    problem: str | None = None
    first_seq: int | None = None
    last_hash: str | None = None


def read_events(paths: list[Path]) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """(``file:line``, event or None when the line is not a JSON object), across files in order."""
    for path in paths:
        with path.open("rb") as handle:
            for number, line in enumerate(handle, start=1):
                try:
                    value = json.loads(line)
                except ValueError:
                    value = None
                yield f"{path}:{number}", value if isinstance(value, dict) else None


def verify_files(paths: list[Path], *, partial: bool = False) -> VerifyResult:
    """Check every link of the chain across files in order; report the first break.

    The chain must start at its genesis (an all-zero ``prev_hash``) unless
    ``partial``: then it may start mid-way, e.g. after older files were archived.
    """
    for path in paths:
        if not path.is_file():
            return VerifyResult(False, 0, f"{path}: cannot read (no such file)")
    prev: str | None = None
    seq: int | None = None
    first: int | None = None
    count = 0
    try:
        for where, event in read_events(paths):
            problem = _link_problem(where, event, prev, seq, partial)
            if problem:
                return VerifyResult(False, count, problem, first, prev)
            assert event is not None
            prev, seq = event["hash"], event.get("seq")
            first = seq if first is None else first
            count += 1
    except OSError as exc:
        return VerifyResult(False, count, f"cannot read ({exc.strerror})", first, prev)
    if count == 0:
        return VerifyResult(False, 0, "no events")
    return VerifyResult(True, count, None, first, prev)


def _link_problem(where: str, event: dict[str, Any] | None, prev: str | None, seq: int | None,
                  partial: bool) -> str | None:
    if event is None:
        return f"{where}: not a JSON object (a damaged or partial line)"
    if not isinstance(event.get("hash"), str) or not isinstance(event.get("prev_hash"), str):
        return f"{where}: missing hash or prev_hash"
    if event_hash(event) != event["hash"]:
        return f"{where}: event was altered (its hash does not match its content)"
    if prev is None:
        if event["prev_hash"] != GENESIS and not partial:
            return (f"{where}: the chain does not start here (prev_hash is not the genesis hash; seq {event.get('seq')}): "
                    "an earlier file is missing; pass the older files first, or --partial")
        return None
    if event["prev_hash"] != prev:
        expected = f" (expected seq {seq + 1}, found seq {event.get('seq')})" if isinstance(seq, int) else ""
        return f"{where}: broken link: prev_hash does not match the previous event{expected}; an event is missing or out of order"
    return None


UNENCODABLE = "audit.unencodable"


def _unencodable(record: dict[str, Any], exc: Exception) -> dict[str, Any]:
    """In place of an event JSON cannot carry (a lone surrogate the door missed), a record that says so: one
    bad event must not lose the others written with it. Its writer is told it was not written."""
    kept = {key: record[key] for key in ("seq", "chain", "timestamp", "prev_hash")}
    about = {key: value for key in ("type", "decision_id", "task_id", "route")
             if isinstance(value := record.get(key), str) and value.isascii()}
    return {**kept, "type": UNENCODABLE, "event": about, "error": type(exc).__name__}
