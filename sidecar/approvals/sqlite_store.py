"""The embedded default: approvals in SQLite, committed before anyone is told about them.

Every statement runs on one dedicated thread (SQLite may block on fsync), never on the
event loop. WAL with synchronous=FULL: an approval acknowledged to the agent survives a
``kill -9`` of the sidecar and a power cut.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from ..problems import Refusal
from .store import (PENDING_LIST_LIMIT, Approval, PendingLimits, RequestBinding, Verdict, Waiters, apply_verdict, mark_used,
                    pending_twin, refuse_past_limits, wait_for_decision)

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS approvals (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS approvals_status ON approvals (status, created_at);
"""
# Added after the first release: an existing database gains the column and its index at start-up.
BINDING_KEY_MIGRATION = (
    "ALTER TABLE approvals ADD COLUMN binding_key TEXT",
    "CREATE INDEX IF NOT EXISTS approvals_binding ON approvals (binding_key, created_at)",
)
# Added with approvals.max_pending_per_*: who an approval is for, so that its pending ones are counted by an index.
# Approvals still pending when the columns are added get them from their record.
PENDING_SCOPE_COLUMNS = ("agent", "task_id")
PENDING_SCOPE_MIGRATION = (
    "UPDATE approvals SET agent = json_extract(doc, '$.binding.agent'), task_id = json_extract(doc, '$.binding.task_id') "
    "WHERE agent IS NULL AND status = 'pending'",
    "CREATE INDEX IF NOT EXISTS approvals_pending_scope ON approvals (agent, task_id, expires_at) "
    "WHERE status = 'pending'",
    "CREATE INDEX IF NOT EXISTS approvals_pending_agent ON approvals (agent, expires_at) WHERE status = 'pending'",
)


class SqliteApprovalStore:
    def __init__(self, path: Path, *, retention_seconds: float = 7 * 86400, max_records: int = 100_000) -> None:
        self.path = path
        self.retention_seconds = retention_seconds
        self.max_records = max_records
        self._waiters = Waiters()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="approvals-sqlite")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=5.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
            self._migrate()
        except sqlite3.Error as exc:
            raise OSError(f"cannot open approval store {path}: {exc}") from None

    def _migrate(self) -> None:
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(approvals)")}
        if "binding_key" not in columns:
            self._db.execute(BINDING_KEY_MIGRATION[0])
        self._db.execute(BINDING_KEY_MIGRATION[1])
        for column in PENDING_SCOPE_COLUMNS:
            if column not in columns:
                self._db.execute(f"ALTER TABLE approvals ADD COLUMN {column} TEXT")
        for statement in PENDING_SCOPE_MIGRATION:
            self._db.execute(statement)

    async def _run(self, work: Callable[[], T]) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, work)
        except sqlite3.Error as exc:
            raise Refusal("store_unavailable", f"approval store (sqlite) failed: {type(exc).__name__}") from None

    # ------------------------------------------------------------ thread side

    def _load(self, approval_id: str) -> Approval | None:
        row = self._db.execute("SELECT doc FROM approvals WHERE id = ?", (approval_id,)).fetchone()
        return Approval.from_json(row[0]) if row else None

    def _save(self, approval: Approval) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO approvals (id, status, created_at, expires_at, doc, binding_key, agent, task_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (approval.id, approval.status, approval.created_at, approval.expires_at, approval.to_json(),
             approval.binding.key, approval.binding.agent, approval.binding.task_id))

    def _transaction(self, work: Callable[[], T]) -> T:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            result = work()
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return result

    def _create(self, approval: Approval, limits: PendingLimits | None) -> Approval:
        def work() -> Approval:
            # Looked up and counted inside the write transaction (BEGIN IMMEDIATE) that files it.
            twin = pending_twin(self._newest(approval.binding), approval, time.time())
            if twin is not None:
                return twin
            if limits is not None:
                refuse_past_limits(limits, *self._pending_of(approval.binding))
            # Past its expiry by the retention, a record goes whatever it says: one still "pending" expired unseen.
            self._db.execute("DELETE FROM approvals WHERE expires_at < ?", (time.time() - self.retention_seconds,))
            (count,) = self._db.execute("SELECT count(*) FROM approvals").fetchone()
            if count >= self.max_records:
                self._db.execute("DELETE FROM approvals WHERE id IN (SELECT id FROM approvals ORDER BY created_at LIMIT ?)",
                                 (count - self.max_records + 1,))
            self._save(approval)
            return approval
        return self._transaction(work)

    def _update(self, approval_id: str, change: Callable[[Approval], T]) -> tuple[Approval | None, T | None]:
        def work() -> tuple[Approval | None, T | None]:
            approval = self._load(approval_id)
            if approval is None:
                return None, None
            result = change(approval)  # a refusal raised here rolls the transaction back
            self._save(approval)
            return approval, result
        return self._transaction(work)

    def _pending(self, limit: int) -> list[Approval]:
        rows = self._db.execute(
            "SELECT doc FROM approvals WHERE status = 'pending' AND expires_at > ? ORDER BY created_at LIMIT ?",
            (time.time(), limit)).fetchall()
        return [Approval.from_json(row[0]) for row in rows]

    def _newest(self, binding: RequestBinding) -> Approval | None:
        """The newest approval made for exactly this binding (any status)."""
        row = self._db.execute("SELECT doc FROM approvals WHERE binding_key = ? ORDER BY created_at DESC LIMIT 1",
                               (binding.key,)).fetchone()
        return Approval.from_json(row[0]) if row else None

    def _pending_of(self, binding: RequestBinding) -> tuple[int, int]:
        """Approvals pending in the binding's task, and of its agent."""
        now = time.time()
        (in_task,) = self._db.execute(
            "SELECT count(*) FROM approvals WHERE status = 'pending' AND agent = ? AND task_id IS ? AND expires_at > ?",
            (binding.agent, binding.task_id, now)).fetchone()
        (of_agent,) = self._db.execute(
            "SELECT count(*) FROM approvals WHERE status = 'pending' AND agent = ? AND expires_at > ?",
            (binding.agent, now)).fetchone()
        return int(in_task), int(of_agent)

    def _count_pending(self) -> int:
        (count,) = self._db.execute("SELECT count(*) FROM approvals WHERE status = 'pending' AND expires_at > ?",
                                    (time.time(),)).fetchone()
        return int(count)

    # ------------------------------------------------------------ protocol

    async def create(self, approval: Approval, limits: PendingLimits | None = None) -> Approval:
        return await self._run(lambda: self._create(approval, limits))

    async def get(self, approval_id: str) -> Approval | None:
        approval = await self._run(lambda: self._load(approval_id))
        if approval is not None:
            approval.status = approval.effective_status(time.time())
        return approval

    async def consume(self, approval_id: str) -> bool:
        _, used = await self._run(lambda: self._update(approval_id, lambda a: mark_used(a, time.time())))
        return bool(used)

    async def decide(self, approval_id: str, verdict: Verdict) -> Approval:
        approval, _ = await self._run(lambda: self._update(approval_id, lambda a: apply_verdict(a, verdict, time.time())))
        if approval is None:
            raise Refusal("approval_invalid", "no such approval")
        self._waiters.wake(approval_id)
        return approval

    async def for_binding(self, binding: RequestBinding) -> Approval | None:
        approval = await self._run(lambda: self._newest(binding))
        if approval is not None:
            approval.status = approval.effective_status(time.time())
        return approval

    async def list_pending(self, limit: int = PENDING_LIST_LIMIT) -> list[Approval]:
        return await self._run(lambda: self._pending(limit))

    async def count_pending(self) -> int:
        return await self._run(self._count_pending)

    async def wait(self, approval_id: str, timeout_seconds: float) -> Approval | None:
        return await wait_for_decision(self.get, self._waiters, approval_id, timeout_seconds)

    async def ping(self) -> tuple[bool, str]:
        try:
            await self._run(lambda: self._db.execute("SELECT 1").fetchone())
        except Refusal as refusal:
            return False, refusal.detail
        return True, f"sqlite {self.path.name} answers"

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._db.close)
        self._executor.shutdown(wait=False)
