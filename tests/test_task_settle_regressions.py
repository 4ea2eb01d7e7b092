"""Regressions found attacking "an expired, unsettled reservation counts as a completed call" (c0ea925).

Each call the task made counts once: not twice because its confirmation arrived after more than
SETTLED_KEPT other settlements (every late confirmation pushes the next one out of ``settled``), nor
because another replica settled the same expired reservations first.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sidecar.tasks.redis_store import RedisTaskStore
from sidecar.tasks.store import SETTLED_KEPT
from test_task_reservations import StoreFactory, make_store, open_task, refund, reserved, summary_of  # noqa: F401

EXPIRED = SETTLED_KEPT + 1  # a sidecar killed with this many calls in flight (MAX_IN_FLIGHT_PER_TASK is 256)


async def test_late_confirmations_of_many_settled_reservations_count_each_call_once(make_store: StoreFactory) -> None:
    """The confirmations of calls whose reservations expired (retried from the backlog after a store outage)
    arrive after the next read or reservation settled them all: each call still counts once."""
    store = make_store()
    task_id = await open_task(store)
    stale = [reserved(refund(), f"d-{n}", seconds=-1) for n in range(EXPIRED)]
    for version, reservation in enumerate(stale):
        assert await store.reserve(task_id, reservation, version=version)
    await summary_of(store, task_id)  # Redis settles them here
    assert await store.reserve(task_id, reserved(refund(), "d-live"), version=EXPIRED)  # memory, SQLite: here
    for reservation in stale:
        await store.confirm(task_id, reservation)
    history = (await summary_of(make_store(), task_id)).as_input()
    assert history["calls"] == EXPIRED + 1, history["calls"]
    assert history["totals"]["amount"] == 49 * (EXPIRED + 1)


async def test_replicas_reading_the_same_expired_reservations_settle_each_once(redis_server: Any) -> None:
    """Two replicas read a task whose sidecar died with calls in flight; the slower one settles after the
    faster one is done: each call still counts once."""
    fast, slow = RedisTaskStore(redis_server.url), RedisTaskStore(redis_server.url)
    try:
        task_id = await open_task(fast)
        for version in range(EXPIRED):
            assert await fast.reserve(task_id, reserved(refund(), f"d-{version}", seconds=-1), version=version)
        read, proceed = asyncio.Event(), asyncio.Event()
        settle = slow._settle_expired

        async def late(*settling: Any) -> None:
            read.set()
            await proceed.wait()  # this replica's loop was busy between its read and its writes
            await settle(*settling)

        slow._settle_expired = late  # type: ignore[method-assign]
        reading = asyncio.ensure_future(slow.get(task_id))
        await asyncio.wait_for(read.wait(), 10)  # the slow replica has read all of them, unsettled
        assert (await summary_of(fast, task_id)).as_input()["calls"] == EXPIRED
        proceed.set()
        await reading
        history = (await summary_of(RedisTaskStore(redis_server.url), task_id)).as_input()
        assert history["calls"] == EXPIRED and history["totals"]["amount"] == 49 * EXPIRED, history["calls"]
    finally:
        await fast.close()
        await slow.close()


async def test_the_in_flight_hash_lives_as_long_as_the_task_it_belongs_to(redis_server: Any) -> None:
    """GET /v1/tasks/{id} shows a task for TASK_RETENTION_SECONDS after its end: an expired reservation nobody
    read since must still be there to be counted, not expire with its hash 24 h after the call."""
    store = RedisTaskStore(redis_server.url)
    try:
        task_id = await open_task(store)
        assert await store.reserve(task_id, reserved(refund(), "d-1", seconds=30), version=0)
        key = store._task_key(task_id)
        task_ttl, in_flight_ttl = await store._redis.ttl(key), await store._redis.ttl(f"{key}:in_flight")
        assert in_flight_ttl >= task_ttl, (in_flight_ttl, task_ttl)
    finally:
        await store.close()


