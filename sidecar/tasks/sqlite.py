"""Tasks and the revocation list in SQLite: the embedded default, survives a restart.

One connection owned by one writer thread, fed by group commit (``GroupCommit``): every
statement the event loop submits joins the batch being gathered, and the writer thread runs
a whole batch as one BEGIN IMMEDIATE ... COMMIT, so a busy sidecar pays for one commit and
one thread hop per batch instead of per write. Batches run one at a time, in submission
order, and the event loop never waits on the disk; within a batch the statements keep their
submission order too, so a later history snapshot can never be overwritten by an earlier
one. The store belongs to one sidecar process (the one that owns the state directory), so it
keeps the live tasks it has touched in a bounded in-memory map: reading a task's history for
a decision costs no thread hop and no JSON decoding.

Durability of each write (WAL; NORMAL = a commit survives a kill -9 of the process, only a
power loss can roll back the last ones; FULL = fsynced before it is acknowledged):

- ``create`` (the task row), ``record`` (a held or denied call), ``reserve``, ``confirm``,
  ``release`` (the history snapshot) and ``record_credential``: NORMAL, each acknowledged only
  once the batch holding it is committed. A reservation is therefore committed before its
  call is forwarded (the pipeline awaits ``reserve`` first), and a credential is known to the
  store before it leaves.
- ``finish`` (the task ended, its credentials revoked): FULL. It joins the batch being
  gathered, and that whole batch commits with FULL, so a revocation waits at most for the one
  batch the writer thread is running when it arrives.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
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
# A pod works on few tasks at once; an evicted task costs its next call one read through the disk
# thread. Measured (tracemalloc, issue 17): ~3.1 KB a task with one call, ~13 KB with a full history
# (20 recent calls, their strings interned, and the settled reservation ids), so 256 keeps the map
# under ~3.5 MB (1,000: ~13 MB).
MAX_CACHED_TASKS = 256
# Callers waiting in the batch being gathered, at most: past it a caller waits until that batch goes to the
# writer thread (bounded memory under a flood; one batch of 512 small statements commits in a few ms).
MAX_BATCH_WAITERS = 512

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

Work = Callable[[sqlite3.Connection], Any]
Outcome = tuple[bool, Any]  # (True, result) or (False, the exception)


class _Op:
    """One statement group of a batch and the callers waiting for it. A history save carries the summary
    instead of its work: it is serialised once, when the batch leaves, with every change made until then."""

    __slots__ = ("work", "waiters", "task_id", "summary", "single")

    def __init__(self, work: Work | None, *, task_id: str | None = None, summary: TaskSummary | None = None,
                 single: bool = True) -> None:
        self.work = work
        self.waiters: list[asyncio.Future[Any]] = []
        self.task_id = task_id
        self.summary = summary
        self.single = single  # one statement: alone in its batch it needs no BEGIN ... COMMIT around it


class _Batch:
    __slots__ = ("ops", "saves", "waiters", "full")

    def __init__(self) -> None:
        self.ops: list[_Op] = []
        self.saves: dict[str, _Op] = {}  # task id -> its history save in this batch, still open
        self.waiters = 0
        self.full = False  # commit with synchronous=FULL (a revocation is in it)


class GroupCommit:
    """The batches of one connection: gathered on the event loop, committed one at a time on a WorkerLane.

    A write joins the batch being gathered. When the writer thread is idle the batch leaves at once (no
    loop turn is spent waiting for company), or, for a write that asks to ``linger``, at the end of the
    current event-loop tick, with everything else submitted in that tick; while the thread commits one
    batch, the next one gathers, and leaves the moment the first is committed. Each caller's future
    resolves after the commit of its batch, all of them in one event-loop callback.

    If a statement fails, the batch is rolled back and each of its statement groups is run again in a
    transaction of its own, so that one bad write fails only its own callers; if the database itself
    fails (disk full, I/O error), every group fails again and every caller gets the error.
    """

    def __init__(self, db: sqlite3.Connection, lane: WorkerLane, max_waiters: int = MAX_BATCH_WAITERS) -> None:
        self._db = db
        self._lane = lane
        self._max_waiters = max_waiters
        self._gathering = _Batch()
        self._busy = False  # a batch is on the writer thread
        self._kick_scheduled = False
        self._room: asyncio.Event | None = None  # set when the gathered batch leaves (callers waiting for room)
        self._idle: asyncio.Event | None = None  # set when no batch is on the thread and none is gathered
        self.transactions = 0  # committed on the writer thread (read by tests and benchmarks)

    async def run(self, work: Work, *, full: bool = False, seal: str | None = None, single: bool = True) -> Any:
        """Run ``work`` in the next batch; ``full`` commits that batch with synchronous=FULL; ``seal`` closes
        that task's history save in the batch (a save submitted after ``work`` must be written after it);
        ``single=False`` when ``work`` runs more than one statement (it always gets a transaction)."""
        if self._gathering.waiters >= self._max_waiters:
            await self._wait_for_room()
        batch = self._gathering
        if seal is not None:
            batch.saves.pop(seal, None)
        batch.full = batch.full or full
        return await self._join(batch, _Op(work, single=single))

    async def save(self, task_id: str, summary: TaskSummary) -> None:
        """Persist the task's history as it is when the batch leaves. Saves of one task in one batch are
        written once, as the latest snapshot; every caller is answered after that write is committed."""
        if self._gathering.waiters >= self._max_waiters:
            await self._wait_for_room()
        await self.save_soon(task_id, summary)

    def save_soon(self, task_id: str, summary: TaskSummary, *, linger: bool = False) -> asyncio.Future[None]:
        """``save`` joining the batch at once, room or not (the caller bounds how often it does this);
        ``linger``: the batch waits for the end of this loop tick (for the writes that follow this one)."""
        batch = self._gathering
        op = batch.saves.get(task_id)
        if op is not None and op.summary is summary:
            return self._join(batch, op, appended=True, linger=linger)  # coalesced: one UPDATE of the latest
        op = batch.saves[task_id] = _Op(None, task_id=task_id, summary=summary)
        return self._join(batch, op, linger=linger)

    @property
    def full(self) -> bool:
        """The batch being gathered has no room left: a caller that can wait should."""
        return self._gathering.waiters >= self._max_waiters

    async def idle(self) -> None:
        """Until every submitted batch is committed (or failed)."""
        while self._busy or self._gathering.ops:
            if self._idle is None:
                self._idle = asyncio.Event()
            await self._idle.wait()

    async def _wait_for_room(self) -> None:
        while self._gathering.waiters >= self._max_waiters:
            if self._room is None:
                self._room = asyncio.Event()
            await self._room.wait()

    def _join(self, batch: _Batch, op: _Op, appended: bool = False, linger: bool = False) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        if not appended:
            batch.ops.append(op)
        future: asyncio.Future[Any] = loop.create_future()
        op.waiters.append(future)
        batch.waiters += 1
        if not self._busy:
            if not linger:
                self._send(loop)
            elif not self._kick_scheduled:
                self._kick_scheduled = True
                loop.call_soon(self._kick)
        return future

    def _kick(self) -> None:
        self._kick_scheduled = False
        if not self._busy and self._gathering.ops:
            self._send(asyncio.get_running_loop())

    def _send(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self._gathering = self._gathering, _Batch()
        if self._room is not None:
            self._room.set()
            self._room = None
        works: list[Work] = []
        try:
            for op in batch.ops:
                if op.summary is not None:  # serialised now, on the loop thread that owns the summary
                    works.append(_summary_update(op.task_id or "", summary_to_json(op.summary)))
                else:
                    assert op.work is not None
                    works.append(op.work)
        except Exception as exc:  # noqa: BLE001 - a history that cannot be serialised: nobody may hang on it
            self._went_idle()
            self._settle(batch, [(False, exc)] * len(batch.ops))
            return
        # A batch of one statement runs in autocommit, which is a transaction of its own: two statements fewer.
        alone = len(batch.ops) == 1 and batch.ops[0].single

        def commit_and_report() -> None:  # on the writer thread
            try:
                outcomes = self._commit(works, batch.full, alone)
            except BaseException as exc:  # noqa: BLE001 - every caller hears of it
                outcomes = [(False, exc)] * len(works)
            try:
                loop.call_soon_threadsafe(self._committed, batch, outcomes)
            except RuntimeError:
                pass  # that loop is closed: nobody waits any more

        self._busy = True
        try:
            self._lane.post(commit_and_report)
        except RuntimeError as exc:  # the lane is stopped (the store is closed)
            self._busy = False
            self._went_idle()
            self._settle(batch, [(False, exc)] * len(batch.ops))

    def _committed(self, batch: _Batch, outcomes: list[Outcome]) -> None:
        self._busy = False
        if self._gathering.ops:
            self._send(asyncio.get_running_loop())  # gathered while this one was committed: leaves at once
        else:
            self._went_idle()
        self._settle(batch, outcomes)

    def _went_idle(self) -> None:
        if self._idle is not None and not self._busy and not self._gathering.ops:
            self._idle.set()
            self._idle = None

    @staticmethod
    def _settle(batch: _Batch, outcomes: list[Outcome]) -> None:
        for op, (ok, value) in zip(batch.ops, outcomes):
            for future in op.waiters:
                if future.done():  # that caller was cancelled; the write went in regardless
                    continue
                if ok:
                    future.set_result(value)
                elif isinstance(value, sqlite3.Error):
                    future.set_exception(Refusal("store_unavailable", f"task store: {type(value).__name__}"))
                else:
                    future.set_exception(value)

    # ------------------------------------------------------------ on the writer thread

    def _commit(self, works: list[Work], full: bool, alone: bool = False) -> list[Outcome]:
        db = self._db
        if full:
            db.execute("PRAGMA synchronous=FULL")  # not allowed inside a transaction: set around it
        try:
            if alone:
                try:
                    result = works[0](db)
                except Exception as exc:  # noqa: BLE001 - handed to its callers
                    return [(False, exc)]
                self.transactions += 1
                return [(True, result)]
            try:
                db.execute("BEGIN IMMEDIATE")
                results = [work(db) for work in works]
                db.execute("COMMIT")
            except Exception as exc:  # noqa: BLE001 - a statement or the commit failed: see below
                _rollback(db)
                if len(works) == 1:
                    return [(False, exc)]
                # Each group alone: one bad statement fails its own callers, not the rest of the batch.
                return [self._alone(work) for work in works]
            self.transactions += 1
            return [(True, result) for result in results]
        finally:
            if full:
                try:
                    db.execute("PRAGMA synchronous=NORMAL")
                except sqlite3.Error:
                    pass  # the next batch fails on its own if the connection is gone

    def _alone(self, work: Work) -> Outcome:
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            result = work(db)
            db.execute("COMMIT")
        except Exception as exc:  # noqa: BLE001 - handed to that group's callers
            _rollback(db)
            return (False, exc)
        self.transactions += 1
        return (True, result)


def _rollback(db: sqlite3.Connection) -> None:
    try:
        if db.in_transaction:
            db.execute("ROLLBACK")
    except sqlite3.Error:
        pass  # a failed COMMIT may have rolled back already


def _release_if_failed(saving: asyncio.Future[None], summary: TaskSummary, reservation_id: str) -> None:
    if saving.cancelled() or saving.exception() is not None:
        summary.release(reservation_id)  # never committed: it must not count, and its call is refused


def _summary_update(task_id: str, snapshot: str) -> Work:
    def update(db: sqlite3.Connection) -> None:
        db.execute("UPDATE tasks SET summary = ? WHERE id = ?", (snapshot, task_id))

    return update


class SqliteTaskStore:
    def __init__(self, path: Path, lane: WorkerLane | None = None) -> None:
        """``lane``: where the connection's work runs (the sidecar's disk lane, shared with the audit writer);
        without one, the store runs a lane of its own."""
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a commit survives a crash of the process (kill -9) without an fsync per
            # batch; only a power loss can roll back the last commits. Revocations, which are promised
            # durable, are committed with FULL (see GroupCommit.run(full=True) in finish).
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            # A page cache of 512 KiB, not SQLite's default 2,000 (issue 17): every statement finds its row by
            # key, so the B-trees' inner pages are what the cache is for; the default filled up with the leaf
            # pages of every task touched (the OS caches those anyway): 2.0 MiB held with 10,000 tasks, 0.5 now.
            self._db.execute("PRAGMA cache_size=-512")
            self._db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise OSError(f"{path}: cannot open the task store ({exc})") from None
        self._owns_lane = lane is None
        self._writer = lane if lane is not None else WorkerLane("task-store")
        self._batches = GroupCommit(self._db, self._writer)
        self._cached: OrderedDict[str, tuple[Task, TaskSummary]] = OrderedDict()
        self._loading: dict[str, asyncio.Future[tuple[Task, TaskSummary] | None]] = {}  # at most one load per task
        # Reservations saved with reserve(wait=False), until their caller asks whether they are committed
        # (or confirms or releases them): at most one per call in flight.
        self._uncommitted: dict[str, asyncio.Future[None]] = {}
        self._pruned_at = 0.0

    @property
    def transactions(self) -> int:
        """Transactions committed so far (one per batch, more when a batch had to be split)."""
        return self._batches.transactions

    async def create(self, *, agent: str, intent: str, labels: dict[str, Any], ttl_seconds: int,
                     allowed_tools: list[str]) -> Task:
        task = new_task(agent=agent, intent=intent, labels=labels, ttl_seconds=ttl_seconds, allowed_tools=allowed_tools)
        row = (task.id, task_to_json(task), summary_to_json(TaskSummary()), task.status, task.expires_at)

        def insert(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO tasks (id, doc, summary, status, expires_at) VALUES (?, ?, ?, ?, ?)", row)
            self._maybe_prune(db)

        await self._batches.run(insert, single=False)
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
        # One load per task at a time: two callers decoding the row each would put two copies of its history
        # in play, and the later save of either would erase what the other recorded (a confirmed call lost).
        loading = self._loading.get(task_id)
        if loading is None:
            loading = self._loading[task_id] = asyncio.ensure_future(self._load(task_id))
            loading.add_done_callback(lambda done: self._loaded(task_id, done))
        return await asyncio.shield(loading)  # a caller that gives up does not cancel the others' load

    def _loaded(self, task_id: str, done: asyncio.Future[tuple[Task, TaskSummary] | None]) -> None:
        self._loading.pop(task_id, None)
        if not done.cancelled():
            done.exception()  # retrieved: callers that gave up before it failed cannot, and each waiting one got it

    async def _load(self, task_id: str) -> tuple[Task, TaskSummary] | None:
        def select(db: sqlite3.Connection) -> tuple[str, str] | None:
            row = db.execute("SELECT doc, summary FROM tasks WHERE id = ?", (task_id,)).fetchone()
            return (row[0], row[1]) if row else None

        # In the batch order: it reads every save submitted before it (an evicted task's last one included).
        found = await self._batches.run(select, seal=task_id)
        cached = self._cached.get(task_id)
        if cached is not None:  # cached meanwhile (created, ended): that copy is the one in play
            return cached
        if found is None:
            return None
        return self._cache(task_from_json(found[0]), summary_from_json(found[1]))

    async def record(self, task_id: str, record: CallRecord) -> None:
        found = await self.get(task_id)
        if found is None:
            return
        found[1].add(record)
        await self._batches.save(task_id, found[1])

    async def reserve(self, task_id: str, reservation: Reservation, *, version: int, wait: bool = True) -> bool:
        """Compare-and-set in memory (this process owns the store), then committed: a restart after a kill -9
        still counts the reservation until it expires.

        ``wait=False`` answers once the compare-and-set is done and the save has joined the batch being
        gathered (so that the credential record of the same call can join it too); the caller must then
        ``await committed(reservation.id)`` before the call is forwarded. If that save fails, the
        reservation is released here and ``committed`` raises store_unavailable."""
        found = await self.get(task_id)
        if found is None or not reserve_in(found[1], reservation, version):
            return False
        summary = found[1]
        if not wait and not self._batches.full:
            saving = self._batches.save_soon(task_id, summary, linger=True)
            self._uncommitted[reservation.id] = saving
            saving.add_done_callback(lambda done: _release_if_failed(done, summary, reservation.id))
            return True
        try:
            await self._batches.save(task_id, summary)
        except Refusal:
            summary.release(reservation.id)
            raise
        return True

    async def committed(self, reservation_id: str) -> None:
        """Until the reservation saved by ``reserve(wait=False)`` is committed (at once for any other)."""
        saving = self._uncommitted.pop(reservation_id, None)
        if saving is not None:
            await asyncio.shield(saving)  # a cancelled caller does not cancel the write

    async def confirm(self, task_id: str, reservation: Reservation) -> None:
        self._uncommitted.pop(reservation.id, None)  # the save of this confirmation comes after it in any case
        found = await self.get(task_id)
        if found is not None:
            found[1].confirm(reservation)  # once: a retry after a slow disk only saves again
            await self._batches.save(task_id, found[1])

    async def release(self, task_id: str, reservation_id: str) -> None:
        self._uncommitted.pop(reservation_id, None)
        found = await self.get(task_id)
        if found is not None:
            found[1].release(reservation_id)
            await self._batches.save(task_id, found[1])

    async def finish(self, task_id: str, status: str) -> Task | None:
        """End the task and revoke its credentials (synchronous=FULL).

        The summary written is this process's own copy, the one every reservation and confirmation of the
        task was applied to, and it stays cached: re-reading the row while writes of the task are still
        queued would put a second copy in play, and a later save of either would erase what the other saw
        (a confirmation lost, a call left in flight for ever)."""
        check_end_status(status)
        found = await self.get(task_id)
        if found is None:
            return None
        task, summary = found
        summary.version += 1  # a decision that read the task open must not reserve on it now
        ending = task.status == "open"
        ended = replace(task, status=status) if ending else task
        row = (task_to_json(ended), status, summary_to_json(summary), task_id)  # taken on the loop, which owns them

        def end(db: sqlite3.Connection) -> None:
            if ending:
                db.execute("UPDATE tasks SET doc = ?, status = ?, summary = ? WHERE id = ? AND status = 'open'", row)
            db.execute("UPDATE task_credentials SET revoked_at = ?, cause = ? WHERE task_id = ? AND revoked_at IS NULL",
                       (time.time(), status, task_id))

        # FULL: the revocation is fsynced before it is acknowledged; it waits at most for the batch in progress.
        await self._batches.run(end, full=True, seal=task_id, single=False)
        if self._cached.get(task_id, (None, None))[1] is summary:
            self._cache(ended, summary)
        return ended

    async def record_credential(self, jti: str, task_id: str | None, expires_at: int) -> None:
        def insert(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO task_credentials (jti, task_id, expires_at) VALUES (?, ?, ?)", (jti, task_id, expires_at))

        await self._batches.run(insert)

    async def credential(self, jti: str) -> CredentialState | None:
        def select(db: sqlite3.Connection) -> CredentialState | None:
            row = db.execute("SELECT task_id, expires_at, revoked_at, cause FROM task_credentials WHERE jti = ?",
                             (jti,)).fetchone()
            return CredentialState(jti, row[0], row[1], row[2] is not None, row[3]) if row else None

        found: CredentialState | None = await self._batches.run(select)
        return found

    async def close(self) -> None:
        await self._batches.idle()

        def shut() -> None:
            self._db.close()

        try:
            try:
                await self._writer.submit(shut)
            except RuntimeError:  # the lane was stopped first: once its thread has ended, nothing else uses the connection
                if await asyncio.to_thread(self._writer.join, 5.0):
                    shut()
        except sqlite3.Error as exc:
            raise Refusal("store_unavailable", f"task store: {type(exc).__name__}") from None
        if self._owns_lane:
            self._writer.stop()
