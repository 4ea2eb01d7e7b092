"""Issue 17, item 2: the SQLite task store commits the writes of a loop tick (or of the time the writer
thread is busy) in one transaction, and answers each caller only after that commit.

Real SQLite files; the transactions are counted from the statements the connection runs (its trace
callback), not from the store's own bookkeeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sidecar.problems import Refusal
from sidecar.tasks import CallRecord
from sidecar.tasks.sqlite import SqliteTaskStore
from sidecar.tasks.store import Reservation, iso_ms


class Statements:
    """Every statement the store's connection runs, on its writer thread."""

    def __init__(self, store: SqliteTaskStore) -> None:
        self.seen: list[str] = []
        store._db.set_trace_callback(self.seen.append)

    def count(self, prefix: str) -> int:
        return sum(1 for s in self.seen if s.startswith(prefix))

    def transactions(self) -> list[list[str]]:
        """The statements of each transaction, in order: BEGIN ... COMMIT, or one statement in autocommit."""
        found: list[list[str]] = []
        inside = False
        for statement in self.seen:
            if statement == "BEGIN IMMEDIATE":
                found.append([])
                inside = True
            elif statement in ("COMMIT", "ROLLBACK"):
                inside = False
            elif statement.startswith("PRAGMA"):
                continue
            elif inside:
                found[-1].append(statement)
            else:
                found.append([statement])
        return found


@contextlib.asynccontextmanager
async def writer_busy(store: SqliteTaskStore) -> AsyncIterator[None]:
    """The writer thread held on a first write: whatever is submitted meanwhile gathers in the next batch."""
    gate = threading.Event()

    def hold() -> None:
        gate.wait()

    store._writer.post(hold)
    first = asyncio.ensure_future(store.record_credential(f"jti-busy-{time.monotonic_ns()}", None, int(time.time()) + 60))
    await asyncio.sleep(0)  # that write has left: the writer is busy with it (held at the gate)
    try:
        yield
        await asyncio.sleep(0)
    finally:
        gate.set()
        await first


def without_the_busy_write(batches: list[list[str]]) -> list[list[str]]:
    return [b for b in batches if not any("jti-busy-" in s for s in b)]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteTaskStore]:
    opened = SqliteTaskStore(tmp_path / "tasks.db")
    yield opened
    await opened.close()


def refund(amount: float = 49) -> CallRecord:
    return CallRecord(route="payments", method="POST", path="/refunds", host="pay.internal", outcome="allow",
                      at=iso_ms(time.time()), amount=amount)


def reservation(decision_id: str) -> Reservation:
    return Reservation(decision_id, refund(), time.time() + 60)


async def open_tasks(store: SqliteTaskStore, count: int) -> list[str]:
    return [(await store.create(agent="a", intent="refunds", labels={}, ttl_seconds=600, allowed_tools=[])).id
            for _ in range(count)]


async def test_concurrent_writes_share_transactions_and_each_is_committed_before_its_caller_hears(
        tmp_path: Path, store: SqliteTaskStore) -> None:
    tasks = await open_tasks(store, 64)
    statements = Statements(store)

    async def reserve_and_record(number: int, task_id: str) -> None:
        assert await store.reserve(task_id, reservation(f"d-{number}"), version=0)
        # Answered after the commit: another connection sees it at once.
        with sqlite3.connect(tmp_path / "tasks.db") as other:
            summary = other.execute("SELECT summary FROM tasks WHERE id = ?", (task_id,)).fetchone()[0]
        assert f"d-{number}" in summary
        await store.record_credential(f"jti-{number}", task_id, int(time.time()) + 60)

    await asyncio.gather(*(reserve_and_record(n, t) for n, t in enumerate(tasks)))
    writes = 2 * len(tasks)
    commits = len(statements.transactions())
    assert statements.count("UPDATE tasks SET summary") == len(tasks)
    assert statements.count("INSERT INTO task_credentials") == len(tasks)
    assert commits < writes / 4, f"{commits} transactions for {writes} concurrent writes"
    assert store.transactions >= commits

    reopened = SqliteTaskStore(tmp_path / "tasks.db")
    try:
        for number, task_id in enumerate(tasks):
            found = await reopened.get(task_id)
            assert found is not None and set(found[1].in_flight) == {f"d-{number}"}
            credential = await reopened.credential(f"jti-{number}")
            assert credential is not None and credential.task_id == task_id
    finally:
        await reopened.close()


async def test_saves_of_one_task_in_one_batch_are_one_update_of_the_latest_history(
        tmp_path: Path, store: SqliteTaskStore) -> None:
    [task_id] = await open_tasks(store, 1)
    statements = Statements(store)
    # Sixteen reservations while the writer is busy (each decided on the version the one before it left).
    async with writer_busy(store):
        saving = [asyncio.ensure_future(store.reserve(task_id, reservation(f"d-{n}"), version=n)) for n in range(16)]
    assert await asyncio.gather(*saving) == [True] * 16
    assert statements.count("UPDATE tasks SET summary") == 1
    assert len(without_the_busy_write(statements.transactions())) == 1
    found = await store.get(task_id)
    assert found is not None and len(found[1].in_flight) == 16

    reopened = SqliteTaskStore(tmp_path / "tasks.db")
    try:
        again = await reopened.get(task_id)
        assert again is not None and len(again[1].in_flight) == 16 and again[1].version == 16
    finally:
        await reopened.close()


async def test_writes_submitted_while_the_writer_commits_go_together_in_the_next_batch(store: SqliteTaskStore) -> None:
    tasks = await open_tasks(store, 33)
    statements = Statements(store)
    first = asyncio.ensure_future(store.record_credential("jti-first", tasks[0], int(time.time()) + 60))
    await asyncio.sleep(0)  # the first write's batch leaves at the end of this tick
    await asyncio.sleep(0)
    rest = [asyncio.ensure_future(store.reserve(t, reservation(f"d-{n}"), version=0)) for n, t in enumerate(tasks[1:])]
    await asyncio.gather(first, *rest)
    batches = statements.transactions()
    assert len(batches) <= 3, batches  # the first alone, the 32 others in one (or two, if the first had finished)
    assert sum(len(b) for b in batches) == 33


async def test_a_failing_batch_fails_every_waiter_with_store_unavailable(tmp_path: Path, store: SqliteTaskStore) -> None:
    tasks = await open_tasks(store, 8)
    # The disk is full: the database may not grow by one page.
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")
    statements = Statements(store)
    big = "x" * 5000  # needs an overflow page: never fits in the pages there are
    async with writer_busy(store):
        writes = [asyncio.ensure_future(store.record_credential(f"{big}-{n}", task_id, int(time.time()) + 60))
                  for n, task_id in enumerate(tasks)]
    outcomes = await asyncio.gather(*writes, return_exceptions=True)
    assert all(isinstance(o, Refusal) and o.code == "store_unavailable" for o in outcomes), outcomes
    assert statements.count("COMMIT") == 0
    assert statements.count("BEGIN IMMEDIATE") == 1 + len(tasks)  # the batch whole, then each write alone
    store._db.execute("PRAGMA max_page_count = 1073741823")
    # Nothing of the failed batch was written, and the store works again.
    assert await store.credential(f"{big}-0") is None
    await store.record_credential("jti-after", tasks[0], int(time.time()) + 60)
    assert await store.credential("jti-after") is not None


async def test_one_failing_statement_fails_only_its_own_caller(store: SqliteTaskStore) -> None:
    tasks = await open_tasks(store, 8)
    await store.record_credential("jti-taken", tasks[0], int(time.time()) + 60)
    statements = Statements(store)
    writes = [store.reserve(t, reservation(f"d-{n}"), version=0) for n, t in enumerate(tasks)]
    duplicate = store.record_credential("jti-taken", tasks[1], int(time.time()) + 60)  # a primary-key clash
    outcomes = await asyncio.gather(*writes, duplicate, return_exceptions=True)
    assert outcomes[:-1] == [True] * len(tasks)
    assert isinstance(outcomes[-1], Refusal) and outcomes[-1].code == "store_unavailable"
    assert statements.count("ROLLBACK") >= 1  # the batch was tried whole first, then each part alone
    for task_id in tasks:
        found = await store.get(task_id)
        assert found is not None and len(found[1].in_flight) == 1
    state = await store.credential("jti-taken")
    assert state is not None and state.task_id == tasks[0]


async def test_the_batch_being_gathered_is_bounded_and_callers_past_it_wait(store: SqliteTaskStore) -> None:
    store._batches._max_waiters = 4
    [task_id] = await open_tasks(store, 1)
    statements = Statements(store)
    await asyncio.gather(*(store.record_credential(f"jti-{n}", task_id, int(time.time()) + 60) for n in range(40)))
    sizes = [len(b) for b in statements.transactions()]
    assert sum(sizes) == 40 and max(sizes) <= 4, sizes
    assert len(sizes) >= 10


async def test_a_revocation_commits_fsynced_in_the_next_batch_with_the_writes_beside_it(store: SqliteTaskStore) -> None:
    tasks = await open_tasks(store, 4)
    for n, task_id in enumerate(tasks):
        await store.record_credential(f"jti-{n}", task_id, int(time.time()) + 60)
    statements = Statements(store)
    async with writer_busy(store):  # the revocation waits for this one batch, not more
        reserves = [asyncio.ensure_future(store.reserve(t, reservation(f"d-{n}"), version=0))
                    for n, t in enumerate(tasks[1:])]
        ending = asyncio.ensure_future(store.finish(tasks[0], "revoked"))
    reserved = await asyncio.gather(*reserves)
    ended = await ending
    assert ended is not None and ended.status == "revoked" and reserved == [True] * 3
    full = statements.seen.index("PRAGMA synchronous=FULL")
    begin = statements.seen.index("BEGIN IMMEDIATE")
    assert full < begin < statements.seen.index("COMMIT") < statements.seen.index("PRAGMA synchronous=NORMAL")
    assert statements.count("COMMIT") == 1
    [fsynced] = [b for b in without_the_busy_write(statements.transactions()) if len(b) > 1]
    assert sum(s.startswith("UPDATE task_credentials SET revoked_at") for s in fsynced) == 1
    assert sum(s.startswith("UPDATE tasks SET summary") for s in fsynced) == 3  # the reservations beside it
    state = await store.credential("jti-0")
    assert state is not None and state.revoked and state.cause == "revoked"
    # The writes that were not a revocation keep synchronous=NORMAL.
    statements.seen.clear()
    await store.record_credential("jti-later", tasks[1], int(time.time()) + 60)
    assert "PRAGMA synchronous=FULL" not in statements.seen


async def test_a_saved_history_read_back_after_eviction_is_the_latest(store: SqliteTaskStore) -> None:
    [task_id] = await open_tasks(store, 1)
    found = await store.get(task_id)
    assert found is not None
    saving = asyncio.ensure_future(store.reserve(task_id, reservation("d-1"), version=0))
    await asyncio.sleep(0)  # reserved in memory, its save waiting in the batch being gathered
    store._cached.clear()  # evicted before its save left: the read that follows must still see it
    again = await store.get(task_id)
    assert await saving
    assert again is not None and set(again[1].in_flight) == {"d-1"}


async def test_a_reservation_not_waited_for_commits_with_the_credential_record_of_its_call(
        tmp_path: Path, store: SqliteTaskStore) -> None:
    [task_id] = await open_tasks(store, 1)
    statements = Statements(store)
    # The pipeline's order: reserve (within the task's turn), mint, record the credential, then before
    # forwarding wait for both: one transaction instead of two.
    assert await store.reserve(task_id, reservation("d-1"), version=0, wait=False)
    found = await store.get(task_id)
    assert found is not None and set(found[1].in_flight) == {"d-1"}  # the next decision counts it already
    await store.record_credential("jti-1", task_id, int(time.time()) + 60)
    await store.committed("d-1")
    [batch] = statements.transactions()
    assert [s.split(" ")[0] for s in batch] == ["UPDATE", "INSERT"]
    with sqlite3.connect(tmp_path / "tasks.db") as other:
        assert "d-1" in other.execute("SELECT summary FROM tasks WHERE id = ?", (task_id,)).fetchone()[0]
    await store.committed("d-1")  # asked again (or for a reservation made waiting): nothing to wait for


async def test_a_reservation_not_waited_for_that_fails_to_commit_is_released_and_refused(store: SqliteTaskStore) -> None:
    [task_id] = await open_tasks(store, 1)
    # The task row's history cannot grow: a full disk.
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")
    big = Reservation("d-big", CallRecord(route="payments", method="POST", path="/r/" + "x" * 6000,
                                          host="pay.internal", outcome="allow", at=iso_ms(time.time())),
                      time.time() + 60)
    assert await store.reserve(task_id, big, version=0, wait=False)
    with pytest.raises(Refusal) as refused:
        await store.committed("d-big")
    assert refused.value.code == "store_unavailable"
    found = await store.get(task_id)
    assert found is not None and found[1].in_flight == {}  # it does not count: its call is refused
    store._db.execute("PRAGMA max_page_count = 1073741823")
