"""The task store and revocation list: memory, SQLite (survives a restart) and Redis (shared by replicas)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from sidecar.tasks import CallRecord, MemoryTaskStore, TaskStore
from sidecar.tasks.store import Reservation
from sidecar.tasks.redis_store import RedisTaskStore
from sidecar.tasks.sqlite import SqliteTaskStore

StoreFactory = Callable[[], TaskStore]


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    opened: list[TaskStore] = []
    shared_memory = MemoryTaskStore()
    if request.param == "redis":
        redis_server = request.getfixturevalue("redis_server")

    def factory() -> TaskStore:
        store: TaskStore
        if request.param == "memory":
            store = shared_memory
        elif request.param == "sqlite":
            store = SqliteTaskStore(tmp_path / "tasks.db")
        else:
            store = RedisTaskStore(redis_server.url)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        if store is not shared_memory:
            await store.close()


def record(outcome: str = "allow", **extra: Any) -> CallRecord:
    return CallRecord(route="crm", method="POST", path="/refunds", host="crm.example.com", outcome=outcome,
                      at="2025-01-01T00:00:00Z", **extra)


async def test_a_task_keeps_its_history_summary(make_store: StoreFactory) -> None:
    store = make_store()
    task = await store.create(agent="spiffe://a", intent="refund order 7", labels={"ticket": "T-1"}, ttl_seconds=60,
                              allowed_tools=["crm"])
    for _ in range(3):
        await store.record(task.id, record(amount=10.0, write=True))
    found = await store.get(task.id)
    assert found is not None
    loaded, summary = found
    assert loaded.intent == "refund order 7" and loaded.labels == {"ticket": "T-1"} and loaded.allowed_tools == ["crm"]
    assert loaded.active(time.time())
    history = summary.as_input()
    assert history["calls"] == 3 and history["totals"]["amount"] == 30.0 and history["by_method"] == {"POST": 3}
    assert len(history["recent"]) == 3
    assert await store.get("t-unknown") is None


async def test_finishing_a_task_revokes_every_credential_it_was_issued(make_store: StoreFactory) -> None:
    store = make_store()
    task = await store.create(agent="a", intent="i", labels={}, ttl_seconds=60, allowed_tools=[])
    other = await store.create(agent="a", intent="j", labels={}, ttl_seconds=60, allowed_tools=[])
    exp = int(time.time()) + 60
    await store.record_credential("jti-1", task.id, exp)
    await store.record_credential("jti-2", task.id, exp)
    await store.record_credential("jti-3", other.id, exp)
    await store.record_credential("jti-4", None, exp)
    state = await store.credential("jti-1")
    assert state is not None and not state.revoked and state.task_id == task.id
    ended = await store.finish(task.id, "completed")
    assert ended is not None and ended.status == "completed"
    for jti in ("jti-1", "jti-2"):
        state = await store.credential(jti)
        assert state is not None and state.revoked and state.cause == "completed"
    for jti in ("jti-3", "jti-4"):
        state = await store.credential(jti)
        assert state is not None and not state.revoked
    assert await store.credential("never-minted") is None
    found = await store.get(task.id)
    assert found is not None and not found[0].active(time.time())
    again = await store.finish(task.id, "revoked")  # an ended task keeps its first end
    assert again is not None and again.status == "completed"
    with pytest.raises(ValueError):
        await store.finish(other.id, "open")


async def test_a_call_confirmed_while_its_task_is_revoked_leaves_nothing_in_flight(make_store: StoreFactory) -> None:
    """The last allowed call answers as the next call's decision revokes the task (a cap reached): its
    confirmation, the revocation and the denied call's record are written together, none erasing another."""
    store = make_store()
    task = await store.create(agent="spiffe://a", intent="read", labels={}, ttl_seconds=60, allowed_tools=[])
    found = await store.get(task.id)
    assert found is not None
    reservation = Reservation("d-last", record(), time.time() + 30)
    assert await store.reserve(task.id, reservation, version=found[1].version)
    await asyncio.gather(store.finish(task.id, "revoked"), store.confirm(task.id, reservation),
                         store.record(task.id, record("deny")))
    ended = await store.get(task.id)
    assert ended is not None and ended[0].status == "revoked"
    history = ended[1].as_input()
    assert history["in_flight"]["calls"] == 0 and history["calls"] == 2


async def test_sqlite_keeps_tasks_and_revocations_across_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state" / "sidecar.db"
    first = SqliteTaskStore(path)
    task = await first.create(agent="a", intent="i", labels={}, ttl_seconds=60, allowed_tools=[])
    await first.record(task.id, record())
    await first.record_credential("jti-r", task.id, int(time.time()) + 60)
    await first.finish(task.id, "revoked")
    await first.close()
    second = SqliteTaskStore(path)
    state = await second.credential("jti-r")
    assert state is not None and state.revoked and state.cause == "revoked"
    found = await second.get(task.id)
    assert found is not None and found[0].status == "revoked" and found[1].calls == 1
    await second.close()


async def test_two_redis_stores_share_tasks_and_revocations(redis_server: Any) -> None:
    a, b = RedisTaskStore(redis_server.url), RedisTaskStore(redis_server.url)
    try:
        task = await a.create(agent="a", intent="i", labels={}, ttl_seconds=60, allowed_tools=[])
        await b.record(task.id, record())
        await a.record(task.id, record())
        await a.record_credential("jti-shared", task.id, int(time.time()) + 60)
        await b.finish(task.id, "completed")
        state = await a.credential("jti-shared")
        assert state is not None and state.revoked
        found = await a.get(task.id)
        assert found is not None and found[0].status == "completed" and found[1].calls == 2
    finally:
        await a.close()
        await b.close()


async def test_redis_going_away_is_a_store_unavailable_refusal(redis_server: Any) -> None:
    from sidecar.problems import Refusal

    store = RedisTaskStore(redis_server.url)
    try:
        redis_server.stop()
        with pytest.raises(Refusal) as refused:
            await store.credential("jti")
        assert refused.value.code == "store_unavailable"
    finally:
        await store.close()


async def test_an_evicted_task_read_by_two_calls_at_once_is_one_history(tmp_path: Path) -> None:
    """Two callers loading a task that left the SQLite store's cache get one history object: with two,
    the later save of either would erase what the other recorded (here: a confirmed refund)."""
    from sidecar.tasks import sqlite as sqlite_store
    from sidecar.tasks.store import iso_ms

    def refund(amount: float) -> CallRecord:
        return CallRecord(route="payments", method="POST", path="/refunds", host="p", outcome="allow",
                          at=iso_ms(time.time()), amount=amount, write=True, measures={"amount": amount})

    store = SqliteTaskStore(tmp_path / "tasks.db")
    task = await store.create(agent="a", intent="refund", labels={}, ttl_seconds=600, allowed_tools=[])
    found = await store.get(task.id)
    assert found is not None
    first = Reservation("d-1", refund(900), time.time() + 60)
    assert await store.reserve(task.id, first, version=found[1].version)
    for _ in range(sqlite_store.MAX_CACHED_TASKS):  # the task leaves the cache
        await store.create(agent="a", intent="other", labels={}, ttl_seconds=600, allowed_tools=[])

    async def next_call() -> None:
        again = await store.get(task.id)
        assert again is not None
        second = Reservation("d-2", refund(1), time.time() + 60)
        assert await store.reserve(task.id, second, version=again[1].version)
        await store.confirm(task.id, second)

    await asyncio.gather(store.confirm(task.id, first), next_call())
    for _ in range(sqlite_store.MAX_CACHED_TASKS):  # out of the cache again
        await store.create(agent="a", intent="other", labels={}, ttl_seconds=600, allowed_tools=[])
    loads = await asyncio.gather(store.get(task.id), store.get(task.id))
    assert loads[0] is not None and loads[1] is not None and loads[0][1] is loads[1][1]
    await store.close()
    reopened = SqliteTaskStore(tmp_path / "tasks.db")
    history = await reopened.get(task.id)
    assert history is not None
    assert history[1].calls == 2 and history[1].totals["amount"] == 901 and not history[1].in_flight
    await reopened.close()
