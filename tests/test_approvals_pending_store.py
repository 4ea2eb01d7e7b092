"""The stores count pending approvals per task and per agent as they file one more (approvals.max_pending_*).

Each store in turn (memory, SQLite, a real redis-server), and for Redis two store clients standing for two
replicas: approvals filed at once never go past a limit, expired and decided ones do not count, an approval
database from before the count columns is migrated with its pending approvals counted."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from sidecar.approvals.sqlite_store import SqliteApprovalStore
from sidecar.approvals.store import Approval, ApprovalStore, MemoryApprovalStore, PendingLimits, RequestBinding, Verdict
from sidecar.problems import Refusal

AGENT = "spiffe://test/ns/agents/sa/agent"
LIMITS = PendingLimits(per_task=3, per_agent=5)

OpenStore = Callable[[], Awaitable[ApprovalStore]]


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OpenStore]:
    """Opens a client of one store; with SQLite and Redis each client sees the same data (two replicas)."""
    opened: list[ApprovalStore] = []
    shared_memory = MemoryApprovalStore()

    async def open_one() -> ApprovalStore:
        store: ApprovalStore = shared_memory
        if request.param == "sqlite":
            store = SqliteApprovalStore(tmp_path / "approvals.db")
        if request.param == "redis":
            from sidecar.approvals.redis_store import RedisApprovalStore

            store = RedisApprovalStore(request.getfixturevalue("redis_server").url)
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        await store.close()


def held(n: int, task: str | None = "t-1", agent: str = AGENT, expires_in: float = 600) -> Approval:
    now = time.time()
    binding = RequestBinding("POST", f"http://crm.internal/notes/{n}", f"{n:064x}", agent, task, "crm")
    return Approval(id=f"ap-{agent[-1]}{task}-{n}", binding=binding, decision_id=f"d-{n}", route="crm", reasons=[],
                    risk="high", approvers_required=1, group=None, created_at=now, expires_at=now + expires_in)


async def file(store: ApprovalStore, approval: Approval) -> str:
    """The code the store answers with: "filed", or the refusal's."""
    try:
        await store.create(approval, LIMITS)
    except Refusal as refusal:
        return f"{refusal.code}:{refusal.extra['pending_scope']}"
    return "filed"


async def test_the_task_limit_then_the_agent_limit(open_store: OpenStore) -> None:
    store = await open_store()
    assert [await file(store, held(n)) for n in range(4)] == ["filed"] * 3 + ["too_many_pending_approvals:task"]
    assert [await file(store, held(n, task=None)) for n in range(3)] == (
        ["filed"] * 2 + ["too_many_pending_approvals:agent"])
    assert await file(store, held(0, task="t-2")) == "too_many_pending_approvals:agent"
    # Another agent's approvals are its own.
    assert await file(store, held(0, agent="spiffe://test/ns/agents/sa/other")) == "filed"
    assert await store.count_pending() == 6


async def test_expired_and_decided_approvals_leave_room(open_store: OpenStore) -> None:
    store = await open_store()
    await store.create(held(0, expires_in=-1))  # already expired, still stored as pending
    assert [await file(store, held(n)) for n in range(1, 5)] == ["filed"] * 3 + ["too_many_pending_approvals:task"]
    await store.decide(held(1).id, Verdict(approver="alice", groups=(), approve=False))
    assert await file(store, held(4)) == "filed"
    await store.decide(held(2).id, Verdict(approver="alice", groups=(), approve=True))  # approved, not yet used
    assert await file(store, held(5)) == "filed"
    assert await file(store, held(6)) == "too_many_pending_approvals:task"


async def test_approvals_filed_at_once_never_go_past_the_limit(open_store: OpenStore) -> None:
    replicas = [await open_store(), await open_store()]
    answers = await asyncio.gather(*(file(replicas[n % 2], held(n)) for n in range(20)))
    assert sorted(answers) == ["filed"] * 3 + ["too_many_pending_approvals:task"] * 17
    assert await replicas[0].count_pending() == 3
    # Other calls (another target each): the same call again would be given its pending approval, not a place.
    answers = await asyncio.gather(*(file(replicas[n % 2], held(100 + n, task=f"t-{n}")) for n in range(20)))
    assert answers.count("filed") == 2  # the agent's 5, 3 of them in t-1


async def test_pending_approvals_stored_before_the_count_columns_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE approvals (id TEXT PRIMARY KEY, status TEXT NOT NULL, created_at REAL NOT NULL, "
                   "expires_at REAL NOT NULL, doc TEXT NOT NULL, binding_key TEXT)")
        for n in range(3):
            approval = held(n)
            db.execute("INSERT INTO approvals VALUES (?, ?, ?, ?, ?, ?)",
                       (approval.id, "pending", approval.created_at, approval.expires_at, approval.to_json(),
                        approval.binding.key))
    store = SqliteApprovalStore(path)
    try:
        assert await file(store, held(3)) == "too_many_pending_approvals:task"
        assert await file(store, held(3, task="t-2")) == "filed"
    finally:
        await store.close()


async def test_sqlite_retention_removes_approvals_that_expired_unseen(tmp_path: Path) -> None:
    """A pending approval nobody decided is an expired one: past the retention it goes like any other record, so
    that an agent's count of pending approvals never reads through months of them (each held call counts them)."""
    store = SqliteApprovalStore(tmp_path / "approvals.db", retention_seconds=60)
    try:
        await store.create(held(1, expires_in=-120))  # expired two minutes ago, never decided: still says "pending"
        await store.create(held(2, expires_in=-30))  # expired, but within the retention
        await store.create(held(3))
        ids = {row[0] for row in sqlite3.connect(tmp_path / "approvals.db").execute("SELECT id FROM approvals")}
        assert ids == {held(2).id, held(3).id}
    finally:
        await store.close()
