"""Tasks and the revocation list in SQLite: the embedded default, survives a restart.

One connection owned by one writer thread: statements run there in the order they
were submitted, so the event loop never waits on the disk and a later history
snapshot can never be overwritten by an earlier one. The store belongs to one
sidecar process (the one that owns the state directory), so it keeps the live
tasks it has touched in a bounded in-memory map: reading a task's history for a
decision costs no thread hop and no JSON decoding.
"""

from __future__ import annotations

import functools
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..lane import WorkerLane
from ..problems import Refusal
from .codec import summary_from_json, summary_to_json, task_from_json, task_to_json
from .store import CallRecord, CredentialState, Reservation, Task, TaskSummary, check_end_status, new_task, reserve_in

T = TypeVar("T")

# Ended and expired tasks stay this long for investigators and GET /v1/tasks/{id}.
TASK_RETENTION_SECONDS = 7 * 24 * 3600
# Expired credentials are dropped after this grace: introspection answers active=false for unknown jtis anyway.
CREDENTIAL_GRACE_SECONDS = 3600
PRUNE_EVERY_SECONDS = 60.0
# Recently used tasks kept decoded in memory (least recently used evicted; the database keeps them all).
# A pod works on few tasks at once; 1,000 keeps the map near 7 MB (about 7 KB a task with full history).
MAX_CACHED_TASKS = 1_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    doc TEXT NOT NULL,
    summary TEXT NOT NULL,
    status TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS task_credentials (
    jti TEXT PRIMARY KEY,
    task_id TEXT,
    expires_at INTEGER NOT NULL,
    revoked_at REAL,
    cause TEXT
);
CREATE INDEX IF NOT EXISTS task_credentials_by_task ON task_credentials(task_id);
"""


def transaction(work: Callable[[sqlite3.Connection], T]) -> Callable[[sqlite3.Connection], T]:
    """Run ``work`` inside BEGIN IMMEDIATE ... COMMIT (read-modify-write stays whole)."""

    def wrapped(db: sqlite3.Connection) -> T:
        db.execute("BEGIN IMMEDIATE")
        try:
            result = work(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    return wrapped


def durable(work: Callable[[sqlite3.Connection], T]) -> Callable[[sqlite3.Connection], T]:
    """Commit ``work`` with synchronous=FULL: fsynced before it returns, even against power loss."""

    def wrapped(db: sqlite3.Connection) -> T:
        db.execute("PRAGMA synchronous=FULL")
        try:
            return work(db)
        finally:
            db.execute("PRAGMA synchronous=NORMAL")

    return wrapped


class SqliteTaskStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a commit survives a crash of the process (kill -9) without an fsync per
            # call; only a power loss can roll back the last commits. Revocations, which are promised
            # durable, are committed with FULL (see `durable`).
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise OSError(f"{path}: cannot open the task store ({exc})") from None
        self._writer = WorkerLane("task-store")
        self._cached: OrderedDict[str, tuple[Task, TaskSummary]] = OrderedDict()
        self._pruned_at = 0.0

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return await self._writer.submit(functools.partial(work, self._db))
        except sqlite3.Error as exc:
            raise Refusal("store_unavailable", f"task store: {type(exc).__name__}") from None

    async def create(self, *, agent: str, intent: str, labels: dict[str, Any], ttl_seconds: int,
                     allowed_tools: list[str]) -> Task:
        task = new_task(agent=agent, intent=intent, labels=labels, ttl_seconds=ttl_seconds, allowed_tools=allowed_tools)
        row = (task.id, task_to_json(task), summary_to_json(TaskSummary()), task.status, task.expires_at)

        def insert(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO tasks (id, doc, summary, status, expires_at) VALUES (?, ?, ?, ?, ?)", row)
            self._maybe_prune(db)

        await self._run(insert)
        self._cache(task, TaskSummary())
        return task

    def _cache(self, task: Task, summary: TaskSummary) -> tuple[Task, TaskSummary]:
        self._cached[task.id] = (task, summary)
        self._cached.move_to_end(task.id)
        while len(self._cached) > MAX_CACHED_TASKS:
            self._cached.popitem(last=False)
        return task, summary

    def _maybe_prune(self, db: sqlite3.Connection) -> None:
        now = time.time()
        if now - self._pruned_at < PRUNE_EVERY_SECONDS:
            return
        self._pruned_at = now
        db.execute("DELETE FROM tasks WHERE expires_at < ?", (now - TASK_RETENTION_SECONDS,))
        db.execute("DELETE FROM task_credentials WHERE expires_at < ?", (int(now - CREDENTIAL_GRACE_SECONDS),))

    async def get(self, task_id: str) -> tuple[Task, TaskSummary] | None:
        cached = self._cached.get(task_id)
        if cached is not None:
            self._cached.move_to_end(task_id)
            return cached

        def select(db: sqlite3.Connection) -> tuple[str, str] | None:
            row = db.execute("SELECT doc, summary FROM tasks WHERE id = ?", (task_id,)).fetchone()
            return (row[0], row[1]) if row else None

        found = await self._run(select)
        if found is None:
            return None
        return self._cache(task_from_json(found[0]), summary_from_json(found[1]))

    async def record(self, task_id: str, record: CallRecord) -> None:
        found = await self.get(task_id)
        if found is None:
            return
        found[1].add(record)
        await self._save_summary(task_id, found[1])

    async def reserve(self, task_id: str, reservation: Reservation, *, version: int) -> bool:
        """Compare-and-set in memory (this process owns the store), then persisted: a restart after a
        kill -9 still counts the reservation until it expires."""
        found = await self.get(task_id)
        if found is None or not reserve_in(found[1], reservation, version):
            return False
        try:
            await self._save_summary(task_id, found[1])
        except Refusal:
            found[1].release(reservation.id)
            raise
        return True

    async def confirm(self, task_id: str, reservation: Reservation) -> None:
        found = await self.get(task_id)
        if found is not None:
            found[1].confirm(reservation)  # once: a retry after a slow disk only saves again
            await self._save_summary(task_id, found[1])

    async def release(self, task_id: str, reservation_id: str) -> None:
        found = await self.get(task_id)
        if found is not None:
            found[1].release(reservation_id)
            await self._save_summary(task_id, found[1])

    async def _save_summary(self, task_id: str, summary: TaskSummary) -> None:
        snapshot = summary_to_json(summary)  # taken now, written in submission order by the one writer thread

        def update(db: sqlite3.Connection) -> None:
            db.execute("UPDATE tasks SET summary = ? WHERE id = ?", (snapshot, task_id))

        await self._run(update)

    async def finish(self, task_id: str, status: str) -> Task | None:
        check_end_status(status)
        cached = self._cached.pop(task_id, None)  # re-read from the database, as ended, on the next get
        if cached is not None:
            cached[1].version += 1  # a decision that read the task open must not reserve on it now

        def end(db: sqlite3.Connection) -> Task | None:
            row = db.execute("SELECT doc, summary FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if row is None:
                return None
            task = task_from_json(row[0])
            if task.status == "open":
                task.status = status
                summary = summary_from_json(row[1])
                summary.version += 1
                db.execute("UPDATE tasks SET doc = ?, status = ?, summary = ? WHERE id = ?",
                           (task_to_json(task), status, summary_to_json(summary), task_id))
            db.execute("UPDATE task_credentials SET revoked_at = ?, cause = ? WHERE task_id = ? AND revoked_at IS NULL",
                       (time.time(), status, task_id))
            return task

        ended = await self._run(durable(transaction(end)))
        self._cached.pop(task_id, None)  # a read that raced the update may have cached the task as open
        return ended

    async def record_credential(self, jti: str, task_id: str | None, expires_at: int) -> None:
        def insert(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO task_credentials (jti, task_id, expires_at) VALUES (?, ?, ?)", (jti, task_id, expires_at))

        await self._run(insert)

    async def credential(self, jti: str) -> CredentialState | None:
        def select(db: sqlite3.Connection) -> CredentialState | None:
            row = db.execute("SELECT task_id, expires_at, revoked_at, cause FROM task_credentials WHERE jti = ?",
                             (jti,)).fetchone()
            return CredentialState(jti, row[0], row[1], row[2] is not None, row[3]) if row else None

        return await self._run(select)

    async def close(self) -> None:
        def shut(db: sqlite3.Connection) -> None:
            db.close()

        await self._run(shut)
        self._writer.stop()
