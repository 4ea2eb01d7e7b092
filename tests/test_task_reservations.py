"""Reservations in every task store (memory, SQLite, Redis), what the policy sees of them, and the
per-task turns: the building blocks under tests/test_task_concurrency.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from sidecar.problems import Refusal
from sidecar.tasks import CallRecord, MemoryTaskStore, TaskStore, TaskSummary
from sidecar.tasks.backlog import RecordBacklog
from sidecar.tasks.codec import reservation_from_json, reservation_to_json, summary_from_json, summary_to_json
from sidecar.tasks.redis_store import RedisTaskStore
from sidecar.tasks.sqlite import SqliteTaskStore
from sidecar.tasks.store import MAX_IN_FLIGHT_PER_TASK, Reservation, iso_ms
from sidecar.tasks.turns import TaskTurns

StoreFactory = Callable[[], TaskStore]


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    """Each call gives another handle on the same store (another replica, for Redis)."""
    opened: list[TaskStore] = []
    shared_memory = MemoryTaskStore()
    shared_sqlite: list[SqliteTaskStore] = []
    redis_url = request.getfixturevalue("redis_server").url if request.param == "redis" else ""

    def factory() -> TaskStore:
        if request.param == "memory":
            return shared_memory
        if request.param == "sqlite":  # one process owns a SQLite store
            if not shared_sqlite:
                shared_sqlite.append(SqliteTaskStore(tmp_path / "tasks.db"))
                opened.append(shared_sqlite[0])
            return shared_sqlite[0]
        store = RedisTaskStore(redis_url)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        await store.close()


def refund(amount: float = 49.0, at: float | None = None) -> CallRecord:
    return CallRecord(route="payments", method="POST", path="/refunds", host="payments.internal", outcome="allow",
                      at=iso_ms(time.time() if at is None else at), amount=amount, write=True, measures={"amount": amount})


def read(classification: str = "confidential") -> CallRecord:
    return CallRecord(route="crm", method="GET", path="/customers/42", host="crm.internal", outcome="allow",
                      at=iso_ms(time.time()), classification=classification)


def reserved(record: CallRecord, decision_id: str, seconds: float = 60.0) -> Reservation:
    return Reservation(decision_id, record, time.time() + seconds)


async def open_task(store: TaskStore) -> str:
    task = await store.create(agent="a", intent="refunds", labels={}, ttl_seconds=600, allowed_tools=[])
    return task.id


async def summary_of(store: TaskStore, task_id: str) -> TaskSummary:
    found = await store.get(task_id)
    assert found is not None
    return found[1]


async def test_a_reservation_counts_at_once_and_apart(make_store: StoreFactory) -> None:
    store = make_store()
    task_id = await open_task(store)
    await store.record(task_id, refund())
    version = (await summary_of(store, task_id)).version
    assert await store.reserve(task_id, reserved(refund(), "d-1"), version=version)
    assert await store.reserve(task_id, reserved(read(), "d-2"), version=version + 1)
    history = (await summary_of(make_store(), task_id)).as_input()
    assert history["calls"] == 3 and history["totals"]["amount"] == 98
    assert history["classifications_read"] == ["confidential"]
    assert history["in_flight"] == {"calls": 2, "totals": {"amount": 49.0, "records": 0.0}}
    entries = [(r["route"], r["state"], r["at"]) for r in history["recent"]]
    assert entries[0][:2] == ("payments", "completed")
    # Oldest first by decision time; two reservations decided in the same millisecond may come in either order.
    if entries[1][2] == entries[2][2]:
        assert sorted(e[:2] for e in entries[1:]) == [("crm", "reserved"), ("payments", "reserved")]
    else:
        assert [e[:2] for e in entries[1:]] == [("payments", "reserved"), ("crm", "reserved")]


async def test_a_reservation_on_a_stale_version_is_refused(make_store: StoreFactory) -> None:
    first, second = make_store(), make_store()
    task_id = await open_task(first)
    version = (await summary_of(first, task_id)).version
    assert await first.reserve(task_id, reserved(refund(), "d-1"), version=version)
    # The second replica decided on the same history: its reservation must not land.
    assert not await second.reserve(task_id, reserved(refund(), "d-2"), version=version)
    await second.record(task_id, refund())  # a held or denied call moves the version too
    current = (await summary_of(second, task_id)).version
    assert current == version + 2
    assert await second.reserve(task_id, reserved(refund(), "d-3"), version=current)
    assert set((await summary_of(first, task_id)).in_flight) == {"d-1", "d-3"}


async def test_confirm_and_release_do_not_move_the_version(make_store: StoreFactory) -> None:
    store = make_store()
    task_id = await open_task(store)
    one, two = reserved(refund(), "d-1"), reserved(refund(10), "d-2")
    assert await store.reserve(task_id, one, version=0)
    assert await store.reserve(task_id, two, version=1)
    await store.confirm(task_id, one)
    await store.release(task_id, "d-2")
    summary = await summary_of(make_store(), task_id)
    assert summary.version == 2 and summary.in_flight == {}
    history = summary.as_input()
    assert history["calls"] == 1 and history["totals"]["amount"] == 49
    assert [r["state"] for r in history["recent"]] == ["completed"]
    # A reservation a decision read is still the decision's history: reserving on version 2 works.
    assert await store.reserve(task_id, reserved(refund(), "d-3"), version=2)


async def test_an_expired_reservation_counts_as_a_completed_call_and_a_late_confirmation_not_again(
        make_store: StoreFactory) -> None:
    """Fail closed: a reservation nobody settled may have reached its upstream (its sidecar died, its
    confirmation was lost, its answer streamed past the route's bound), so the task keeps counting it."""
    store = make_store()
    task_id = await open_task(store)
    stale = reserved(refund(), "d-1", seconds=-1)
    assert await store.reserve(task_id, stale, version=0)
    history = (await summary_of(store, task_id)).as_input()
    assert history["in_flight"]["calls"] == 0 and history["totals"]["amount"] == 49 and history["calls"] == 1
    assert [r["state"] for r in history["recent"]] == ["completed"]
    # The next reservation settles it into the stored history, for every reader.
    assert await store.reserve(task_id, reserved(refund(), "d-2"), version=1)
    history = (await summary_of(make_store(), task_id)).as_input()
    assert history["calls"] == 2 and history["totals"]["amount"] == 98 and history["in_flight"]["calls"] == 1
    await store.confirm(task_id, stale)  # the upstream answered after all: counted once
    await store.release(task_id, "d-1")
    history = (await summary_of(make_store(), task_id)).as_input()
    assert history["calls"] == 2 and history["totals"]["amount"] == 98


async def test_ending_a_task_refuses_reservations_decided_before(make_store: StoreFactory) -> None:
    store = make_store()
    task_id = await open_task(store)
    version = (await summary_of(store, task_id)).version
    assert await store.finish(task_id, "revoked") is not None
    assert not await store.reserve(task_id, reserved(refund(), "d-1"), version=version)


async def test_calls_in_flight_per_task_are_bounded(make_store: StoreFactory) -> None:
    store = make_store()
    task_id = await open_task(store)
    for n in range(MAX_IN_FLIGHT_PER_TASK):
        assert await store.reserve(task_id, reserved(refund(0), f"d-{n}"), version=n)
    with pytest.raises(Refusal) as refused:
        await store.reserve(task_id, reserved(refund(0), "one-more"), version=MAX_IN_FLIGHT_PER_TASK)
    assert refused.value.code == "task_contended" and refused.value.status == 503


async def test_reservations_survive_a_restart_in_sqlite(tmp_path: Path) -> None:
    store = SqliteTaskStore(tmp_path / "tasks.db")
    task_id = await open_task(store)
    await store.reserve(task_id, reserved(refund(), "d-1"), version=0)
    await store.close()
    reopened = SqliteTaskStore(tmp_path / "tasks.db")
    try:
        summary = await summary_of(reopened, task_id)
        assert set(summary.in_flight) == {"d-1"} and summary.version == 1
        assert summary.as_input()["totals"]["amount"] == 49
    finally:
        await reopened.close()


def test_the_summary_codec_keeps_reservations_and_version() -> None:
    summary = TaskSummary()
    summary.add(refund())
    summary.reserve(reserved(read(), "d-1"))
    again = summary_from_json(summary_to_json(summary))
    assert again.version == 2 and again.in_flight == summary.in_flight
    assert again.as_input() == summary.as_input()
    apart = summary_from_json(summary_to_json(summary, in_flight=False))  # Redis keeps them in their own keys
    assert apart.in_flight == {} and apart.version == 0 and apart.calls == 1


# Written by the codec before its strings were interned (issue 17): rows and values stored then must decode,
# and what is stored now must be the same bytes, with each record's "reads" (null for REST calls) added.
STORED_HISTORY = (
    '{"calls":2,"by_route":{"payments":2},"by_method":{"POST":2},"by_tool":{"refund":1},"totals":{"amount'
    '":49.5,"records":0.0,"items":2},"external_hosts_written":["api.pay.example"],"classifications_read":'
    '[],"recent":[{"route":"payments","method":"POST","path":"/pay/refund/1","host":"api.pay.example","ou'
    'tcome":"deny","at":"2026-11-27T15:00:01.123Z","amount":49.5,"records":0.0,"classification":"confiden'
    'tial","external":true,"write":true,"measures":{"amount":49.5,"items":2},"tool":null},{"route":"payme'
    'nts","method":"POST","path":"/pay/refund/2","host":"api.pay.example","outcome":"allow","at":"2026-11'
    '-27T15:00:02.123Z","amount":49.5,"records":0.0,"classification":"confidential","external":true,"writ'
    'e":true,"measures":{"amount":49.5,"items":2},"tool":"refund"}]'
)
STORED_SUMMARY = STORED_HISTORY + (
    ',"version":3,"in_flight":[{"id":"d-3","expires_at":1900000001.0,"record":{"route":"payments","method'
    '":"POST","path":"/pay/refund/3","host":"api.pay.example","outcome":"allow","at":"2026-11-27T15:00:03'
    '.123Z","amount":49.5,"records":0.0,"classification":"confidential","external":true,"write":true,"mea'
    'sures":{"amount":49.5,"items":2},"tool":null}}],"settled":["d-2"]}'
)
STORED_SUMMARY_APART = STORED_HISTORY + ',"settled":["d-2"]}'

STORED_RESERVATION = (
    '{"id":"d-2","expires_at":1900000000.5,"record":{"route":"payments","method":"POST","path":"/pay/refu'
    'nd/2","host":"api.pay.example","outcome":"allow","at":"2026-11-27T15:00:02.123Z","amount":49.5,"reco'
    'rds":0.0,"classification":"confidential","external":true,"write":true,"measures":{"amount":49.5,"ite'
    'ms":2},"tool":"refund"}}'
)


def _stored_record(n: int, outcome: str = "allow", tool: str | None = None) -> CallRecord:
    return CallRecord(route="payments", method="POST", path=f"/pay/refund/{n}", host="api.pay.example", outcome=outcome,
                      at=f"2026-11-27T15:00:0{n}.123Z", amount=49.5, records=0.0, classification="confidential",
                      external=True, write=True, measures={"amount": 49.5, "items": 2}, tool=tool)


def test_the_codec_writes_and_reads_the_bytes_it_wrote_before_slots() -> None:
    summary = TaskSummary()
    summary.add(_stored_record(1, outcome="deny"))
    confirmed = Reservation("d-2", _stored_record(2, tool="refund"), 1900000000.5)
    summary.reserve(confirmed)
    summary.confirm(confirmed)
    summary.reserve(Reservation("d-3", _stored_record(3), 1900000001.0))
    assert summary_to_json(summary) == _with_reads(STORED_SUMMARY)
    assert summary_to_json(summary, in_flight=False) == _with_reads(STORED_SUMMARY_APART)
    assert reservation_to_json(confirmed) == _with_reads(STORED_RESERVATION)
    for stored in (STORED_SUMMARY, STORED_SUMMARY.encode()):
        again = summary_from_json(stored)
        assert summary_to_json(again) == _with_reads(STORED_SUMMARY) and again.settled == ["d-2"] and again.version == 3
        assert again.as_input(now=0) == summary.as_input(now=0)
    assert summary_to_json(summary_from_json(STORED_SUMMARY_APART), in_flight=False) == _with_reads(STORED_SUMMARY_APART)
    assert reservation_from_json(STORED_RESERVATION) == confirmed


def _with_reads(stored: str) -> str:
    return stored.replace('"tool":null}', '"tool":null,"reads":null}').replace('"tool":"refund"}', '"tool":"refund","reads":null}')


def test_decoded_records_share_their_repeated_strings_and_keep_the_newest_twenty() -> None:
    summary = TaskSummary()
    for _ in range(25):
        summary.add(read())
    stored = summary_to_json(summary)
    assert stored.count('"route"') == 20
    longer = stored.replace('"recent":[', '"recent":[' + ",".join([orjson.dumps(_stored_record(9)).decode()] * 5) + ",", 1)
    for text, kept in ((stored, summary.recent), (longer, summary.recent)):  # a list longer than twenty: its newest
        again = summary_from_json(text)
        assert list(again.recent) == list(kept) and len(again.recent) == 20
    first, second = list(summary_from_json(stored).recent)[:2]
    for name in ("route", "method", "host", "outcome", "classification"):
        assert getattr(first, name) is getattr(second, name), name
    assert first.at is not second.at


def test_recent_keeps_the_newest_twenty_with_reservations_last() -> None:
    summary = TaskSummary()
    start = time.time() - 100
    for n in range(25):
        summary.add(refund(1, at=start + n))
    for n in range(3):
        summary.reserve(reserved(refund(1, at=start + 50 + n), f"d-{n}"))
    recent = summary.as_input()["recent"]
    assert len(recent) == 20 and [r["state"] for r in recent] == ["completed"] * 17 + ["reserved"] * 3
    assert [r["at"] for r in recent] == sorted(r["at"] for r in recent)


async def test_turns_serialise_one_task_and_never_make_two_tasks_wait() -> None:
    turns = TaskTurns()
    inside: list[str] = []
    first_in = asyncio.Event()
    release = asyncio.Event()

    async def hold(task_id: str, label: str) -> None:
        async with turns.turn(task_id):
            inside.append(label)
            first_in.set()
            await release.wait()

    holder = asyncio.ensure_future(hold("t-1", "first"))
    await first_in.wait()
    waiter = asyncio.ensure_future(hold("t-1", "second"))
    async with turns.turn("t-2"):  # another task: its turn is free although t-1's is taken
        assert inside == ["first"] and len(turns) == 2
    release.set()
    await asyncio.gather(holder, waiter)
    assert inside == ["first", "second"]
    assert len(turns) == 0  # nothing kept for tasks without a call being decided


async def test_a_cancelled_waiter_leaves_no_turn_behind() -> None:
    turns = TaskTurns()
    entered = asyncio.Event()
    release = asyncio.Event()

    async def hold() -> None:
        async with turns.turn("t-1"):
            entered.set()
            await release.wait()

    holder = asyncio.ensure_future(hold())
    await entered.wait()
    waiter = asyncio.ensure_future(hold())
    while turns._turns["t-1"].users < 2:  # the waiter queues on the lock
        await asyncio.sleep(0)
    waiter.cancel()
    release.set()
    await holder
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert len(turns) == 0


async def test_the_backlog_retries_until_the_store_takes_the_write() -> None:
    written: list[dict[str, Any]] = []
    sizes: list[int] = []
    backlog = RecordBacklog(on_written=lambda pending: written.append(pending.what), on_size=sizes.append)
    store_down = True
    attempts = 0

    async def write() -> None:
        nonlocal attempts
        attempts += 1
        if store_down:
            raise Refusal("store_unavailable", "task store (redis): ConnectionError")

    runner = asyncio.ensure_future(backlog.run())
    try:
        backlog.add({"decision_id": "d-1", "task_id": "t-1", "record": "task_history"}, write)
        assert (await backlog.ready())[0] is False

        async def tried_twice() -> None:
            while attempts < 2:
                await asyncio.sleep(0.01)
        await asyncio.wait_for(tried_twice(), 10)
        store_down = False

        async def drained() -> None:
            while len(backlog):
                await asyncio.sleep(0.01)
        await asyncio.wait_for(drained(), 10)
    finally:
        runner.cancel()
    assert written == [{"decision_id": "d-1", "task_id": "t-1", "record": "task_history"}]
    assert sizes[0] == 1 and sizes[-1] == 0 and (await backlog.ready())[0] is True


def test_the_backlog_is_bounded() -> None:
    dropped: list[dict[str, Any]] = []
    backlog = RecordBacklog(capacity=3, on_dropped=lambda pending: dropped.append(pending.what))

    async def write() -> None:
        return None

    for n in range(5):
        backlog.add({"decision_id": f"d-{n}"}, write)
    assert len(backlog) == 3 and dropped == [{"decision_id": "d-0"}, {"decision_id": "d-1"}]


def test_recent_is_in_decision_order_whatever_the_order_of_the_answers() -> None:
    summary = TaskSummary()
    start = time.time() - 10
    slow, fast = reserved(refund(1, at=start), "d-slow"), reserved(refund(2, at=start + 1), "d-fast")
    summary.reserve(slow)
    summary.reserve(fast)
    summary.confirm(fast)  # the later call answered first
    assert [(r["at"], r["state"]) for r in summary.as_input()["recent"]] == [
        (slow.record.at, "reserved"), (fast.record.at, "completed")]
    summary.confirm(slow)
    assert [r["at"] for r in summary.as_input()["recent"]] == [slow.record.at, fast.record.at]


async def test_stopping_tries_every_queued_record_once_more() -> None:
    written: list[str] = []
    backlog = RecordBacklog()

    def write_of(name: str) -> Callable[[], Any]:
        async def write() -> None:
            written.append(name)
        return write

    backlog.add({"decision_id": "d-1"}, write_of("d-1"))
    backlog.add({"decision_id": "d-2"}, write_of("d-2"))
    await backlog.flush(5.0)
    assert written == ["d-1", "d-2"] and len(backlog) == 0


async def test_a_retried_confirmation_counts_the_call_once(make_store: StoreFactory) -> None:
    store = make_store()
    task_id = await open_task(store)
    call = reserved(refund(), "d-1")
    assert await store.reserve(task_id, call, version=0)
    await store.confirm(task_id, call)
    await make_store().confirm(task_id, call)  # the background retry of a write whose answer was lost
    history = (await summary_of(make_store(), task_id)).as_input()
    assert history["calls"] == 1 and history["totals"]["amount"] == 49 and history["in_flight"]["calls"] == 0


async def test_a_measure_beyond_a_double_saturates_and_leaves_its_task_readable(make_store: StoreFactory) -> None:
    """1e308 + 1e308 (two amounts of an MCP batch) is infinity, which JSON stores as null: a reservation or a
    record holding it made every later read of its task fail. It is the largest float instead, over every cap."""
    import sys

    store = make_store()
    task_id = await open_task(store)
    huge = refund(amount=1e308 + 1e308)
    assert huge.amount == sys.float_info.max and huge.measures == {"amount": sys.float_info.max}
    assert await store.reserve(task_id, reserved(huge, "d-1", seconds=-1), version=0)  # expired: settled on reading
    history = (await summary_of(make_store(), task_id)).as_input()
    assert history["calls"] == 1 and history["totals"]["amount"] == sys.float_info.max
    assert await store.reserve(task_id, reserved(huge, "d-2"), version=1)
    history = (await summary_of(make_store(), task_id)).as_input()
    assert history["calls"] == 2 and history["in_flight"]["totals"]["amount"] == sys.float_info.max


def test_allowed_calls_pushed_out_of_recent_are_stored_once_and_read_back() -> None:
    """``recent_allowed`` shares its records with ``recent``; only the older ones are written apart."""
    from dataclasses import replace

    summary = TaskSummary()
    for n in range(23):
        summary.add(replace(_stored_record(0, outcome="allow" if n < 3 else "hold"), at=f"2026-11-27T15:00:{n:02d}.123Z"))
    stored = summary_to_json(summary)
    assert stored.count('"outcome":"allow"') == 3 and '"allowed_before"' in stored
    again = summary_from_json(stored)
    assert again.as_policy_input(now=0) == summary.as_policy_input(now=0)
    assert len(again.as_policy_input(now=0)["recent"]["at_ms"]["allow"]) == 3
    assert summary_to_json(again) == stored
