"""Task history: route-configured measures, their totals in every store, bounded memory, and the
chained-intent rules of the shipped library deciding on that history through a real sidecar."""

from __future__ import annotations

import copy
import json
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness import SHIPPED_POLICY, EchoTool, RunningSidecar, sidecar_config
from sidecar.config import ConfigError, parse_config
from sidecar.documents import McpCall
from sidecar.tasks import CallRecord, MemoryTaskStore, TaskSummary
from sidecar.tasks.measures import (
    DEFAULT_MEASURES,
    Measure,
    MeasurePathError,
    call_measures,
    destination_external,
    effective_measures,
    parse_path,
    path_value,
    payload,
    summed_measures,
)
from sidecar.tasks.redis_store import RedisTaskStore
from sidecar.tasks.sqlite import TASK_RETENTION_SECONDS, SqliteTaskStore

SHIPPED = {"engine": "embedded", "rego_dir": str(SHIPPED_POLICY), "timeout_ms": 2000}


def measures(**paths: list[str]) -> tuple[Measure, ...]:
    return tuple(Measure(name, tuple(parse_path(p) for p in texts)) for name, texts in paths.items())


# ---------------------------------------------------------------- measure paths


@pytest.mark.parametrize("text, document, expected", [
    ("$.amount", {"amount": 49}, 49.0),
    ("$.amount", {"amount": "49.50"}, 49.5),
    ("$.amount", {"amount": -49}, 49.0),  # a negative amount never lowers a total
    ("$.amount", {"amount": True}, None),
    ("$.amount", {"amount": "49 USD"}, None),
    ("$.amount", {"other": 1}, None),
    ("$.amount", [{"amount": 1}], None),
    ("$.refund.amount", {"refund": {"amount": 12}}, 12.0),
    ("$.lines[1].qty", {"lines": [{"qty": 1}, {"qty": 7}]}, 7.0),
    ("$.lines[5].qty", {"lines": [{"qty": 1}]}, None),
    ("$.lines[*].qty", {"lines": [{"qty": 1}, {"qty": 7}, {"other": 3}]}, 8.0),
    ("$[*].amount", [{"amount": 10}, {"amount": 20}], 30.0),
    ("$.ids#count", {"ids": [1, 2, 3]}, 3.0),
    ("$.ids.length()", {"ids": []}, 0.0),
    ("$.ids#count", {"ids": "1,2,3"}, None),
    ("$.batch[*].ids#count", {"batch": [{"ids": [1, 2]}, {"ids": [3]}]}, 3.0),
    ("$", 5, 5.0),
    ("$.x-y_z", {"x-y_z": 2}, 2.0),
])
def test_measure_path_values(text: str, document: Any, expected: float | None) -> None:
    assert path_value(parse_path(text), document) == expected


@pytest.mark.parametrize("text, message", [
    ("amount", "must start with $"),
    ("$amount", "unexpected 'amount'"),
    ("$.a b", "unexpected ' b' at character 4"),
    ("$.a[-1]", "unexpected '[-1]'"),
    ("$.a['b']", "unexpected"),
    ("$.a.__class__()", "unexpected '()'"),
    ("$." + "a." * 17 + "a", "more than 16 steps"),
    ("$." + "a" * 300, "longer than 200 characters"),
])
def test_bad_measure_paths_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(MeasurePathError) as caught:
        parse_path(text)
    assert message in str(caught.value)


def test_first_path_that_finds_a_value_wins() -> None:
    amount = measures(amount=["$.amount", "$.refund.amount"])
    assert call_measures(amount, {"refund": {"amount": 3}}) == {"amount": 3.0}
    assert call_measures(amount, {"amount": 1, "refund": {"amount": 3}}) == {"amount": 1.0}
    assert call_measures(amount, {"nothing": 1}) == {}
    assert call_measures(amount, None) == {}


def test_defaults_fill_in_what_a_route_does_not_configure() -> None:
    configured = measures(amount=["$.refund.amount"], items=["$.lines#count"])
    effective = effective_measures(configured)
    assert [m.name for m in effective] == ["amount", "items", "records"]
    assert call_measures(effective, {"refund": {"amount": 5}, "amount": 900, "lines": [1, 2], "records": [1, 2, 3]}) == {
        "amount": 5.0, "items": 2.0, "records": 3.0}
    assert effective_measures(()) == DEFAULT_MEASURES


def test_mcp_measures_read_the_tools_call_arguments() -> None:
    refund = McpCall(method="tools/call", id=1, tool="refund", arguments={"amount": 49})
    listing = McpCall(method="tools/list", id=2, tool=None, arguments=None)
    body = {"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "refund", "arguments": {"amount": 49}}}
    assert payload(body, refund) == {"amount": 49}
    assert payload(body, listing) is None
    assert payload(body, None) is body
    amount = measures(amount=["$.amount"])
    assert summed_measures(amount, [payload(body, refund), payload(body, refund), payload(body, listing)]) == {"amount": 98.0}


@pytest.mark.parametrize("labels, host, external", [
    ({}, "api.example.com", True),
    ({}, "crm.internal", False),
    ({}, "payments.default.svc.cluster.local", False),
    ({}, "127.0.0.1", False),
    ({}, "10.1.2.3", False),
    ({}, "172.20.0.1", False),
    ({}, "8.8.8.8", True),
    ({}, "::1", False),
    ({}, "[2001:db8::1]", True),
    ({"external": True}, "127.0.0.1", True),
    ({"external": "true"}, "127.0.0.1", True),
    ({"external": False}, "api.partner.example", False),
    ({"external": "maybe"}, "api.partner.example", True),
])
def test_external_destination(labels: dict[str, Any], host: str, external: bool) -> None:
    assert destination_external(labels, host) is external


# ---------------------------------------------------------------- config


def config_with_measures(value: Any) -> dict[str, Any]:
    return {"identity": {"static": "spiffe://t/a"}, "policy": {"engine": "rest"},
            "routes": [{"name": "crm", "match": {"path_prefix": "/crm"}, "upstream": "http://127.0.0.1:1"},
                       {"name": "payments", "match": {"path_prefix": "/payments"}, "upstream": "http://127.0.0.1:1",
                        "measures": value}]}


def test_route_measures_are_compiled_at_start_up() -> None:
    config = parse_config(config_with_measures({"amount": ["$.amount", "$.refund.amount"], "items": ["$.lines#count"]}),
                          Path("sidecar.yaml"))
    route = config.routes[1]
    assert [m.name for m in route.measures] == ["amount", "items"]
    assert route.measures[1].paths[0].count and config.routes[0].measures == ()


@pytest.mark.parametrize("value, error", [
    ({"amount": ["amount"]}, "sidecar.yaml: routes[1].measures.amount[0]: must start with $"),
    ({"amount": ["$.amount", "$.a..b"]}, "sidecar.yaml: routes[1].measures.amount[1]: unexpected '..b'"),
    ({"amount": [7]}, "sidecar.yaml: routes[1].measures.amount[0]: must be a string"),
    ({"amount": []}, "sidecar.yaml: routes[1].measures.amount: must be a list of 1 to 8 JSON paths"),
    ({"amount": "$.amount"}, "sidecar.yaml: routes[1].measures.amount: must be a list"),
    ({"Amount": ["$.amount"]}, "sidecar.yaml: routes[1].measures.Amount: a measure name is lower-case"),
    (["$.amount"], "sidecar.yaml: routes[1].measures: must be a mapping"),
    ({f"m{i}": ["$.a"] for i in range(9)}, "sidecar.yaml: routes[1].measures: at most 8 measures per route"),
])
def test_bad_measures_name_file_and_key_path(value: Any, error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(config_with_measures(value), Path("sidecar.yaml"))
    assert str(caught.value).startswith(error), str(caught.value)


# ---------------------------------------------------------------- the summary


def call(outcome: str = "allow", **fields: Any) -> CallRecord:
    base: dict[str, Any] = {"route": "payments", "method": "POST", "path": "/refunds", "host": "payments.internal",
                            "outcome": outcome, "at": "2025-01-01T00:00:00Z", "write": True}
    return CallRecord(**{**base, **fields})


def test_totals_carry_every_configured_measure_of_allowed_calls() -> None:
    summary = TaskSummary()
    for _ in range(3):
        summary.add(call(amount=49, measures={"amount": 49, "items": 2}))
    summary.add(call("hold", amount=49, measures={"amount": 49, "items": 2}))
    summary.add(call("deny", measures={"items": 100}))
    history = summary.as_input()
    assert history["totals"] == {"amount": 147.0, "records": 0.0, "items": 6.0}
    assert history["calls"] == 5 and len(history["recent"]) == 5


def test_totals_that_overflow_saturate_instead_of_becoming_infinite() -> None:
    """1e308 + 1e308 is infinity, which JSON cannot carry: a total stays finite and over every cap."""
    import sys

    from sidecar.jsoncodec import JsonDocument, loads

    summary = TaskSummary()
    for _ in range(2):
        summary.add(call(amount=1e308, measures={"amount": 1e308}))
    history = summary.as_input()
    assert history["totals"]["amount"] == sys.float_info.max
    assert loads(JsonDocument({"history": history}).json)["history"]["totals"]["amount"] == sys.float_info.max


def test_a_measure_that_overflows_is_the_largest_float_never_infinity_or_nothing() -> None:
    """A wildcard sum beyond a double, a batch's sum, and an integer beyond a double each count as over every
    cap: infinity would be written null in the chain, and an ignored leaf would give the budget back."""
    import sys

    biggest = sys.float_info.max
    assert path_value(parse_path("$.items[*].amount"), {"items": [{"amount": 1e308}] * 2}) == biggest
    assert path_value(parse_path("$.amount"), {"amount": 10 ** 400}) == biggest
    assert summed_measures(DEFAULT_MEASURES, [{"amount": 1e308}, {"amount": 1e308}])["amount"] == biggest
    assert call(amount=10 ** 400, measures={"amount": 2 ** 1100}).measure_values()["amount"] == biggest


def test_external_hosts_and_classifications_count_only_what_was_forwarded() -> None:
    summary = TaskSummary()
    summary.add(call(method="GET", write=False, route="crm", host="crm.internal", classification="confidential"))
    summary.add(call("deny", method="GET", write=False, route="hr", host="hr.internal", classification="restricted"))
    summary.add(call(host="hooks.example.com", external=True))
    summary.add(call(host="hooks.example.com", external=True))
    summary.add(call("hold", host="paste.example.org", external=True))
    summary.add(call(host="payments.internal", external=False))
    history = summary.as_input()
    assert history["classifications_read"] == ["confidential"]
    assert history["external_hosts_written"] == ["hooks.example.com"]


def test_a_slow_call_settled_late_does_not_push_a_later_call_out_of_the_rate_window() -> None:
    """``recent`` holds the latest calls by decision time. Appended when it settled, the slow call decided at
    :00 evicted the call decided at :01, so a rate window over the last calls counted one call fewer."""
    from sidecar.tasks.store import Reservation

    summary = TaskSummary()
    slow = Reservation("slow", call(at="2025-01-01T00:00:00Z"), expires_at=2e9)
    summary.reserve(slow)
    for second in range(1, 21):
        summary.add(call(at=f"2025-01-01T00:00:{second:02d}Z"))
    summary.confirm(slow)
    kept = summary.as_policy_input(now=1.9e9)["recent"]["at_ms"]["allow"]
    assert kept == [1735689600000 + 1000 * second for second in range(1, 21)]
    assert summary.calls == 21
    summary.add(call(at="2025-01-01T00:00:10.5Z"))  # settled late too, but among the latest: kept in order
    assert [r.at for r in summary.recent][8:11] == ["2025-01-01T00:00:10Z", "2025-01-01T00:00:10.5Z",
                                                    "2025-01-01T00:00:11Z"]


def test_agent_chosen_keys_are_bounded() -> None:
    summary = TaskSummary()
    for n in range(100):
        summary.add(call(method=f"M{n}", tool=f"tool_{n}", measures={f"m{n}": 1}))
    assert len(summary.by_method) == 33 and summary.by_method["other"] == 68
    assert len(summary.by_tool) == 33 and len(summary.totals) == 33
    assert len(summary.as_input()["recent"]) == 20


# ---------------------------------------------------------------- the stores


def history_calls() -> list[CallRecord]:
    return [call(amount=49, measures={"amount": 49, "items": 2}, tool="refund"),
            call(method="GET", write=False, route="crm", host="crm.internal", classification="confidential"),
            call(host="hooks.example.com", external=True)]


async def test_history_survives_a_restart_in_sqlite(tmp_path: Path) -> None:
    store = SqliteTaskStore(tmp_path / "tasks.db")
    task = await store.create(agent="a", intent="refunds", labels={}, ttl_seconds=600, allowed_tools=[])
    for record in history_calls():
        await store.record(task.id, record)
    before = (await store.get(task.id))
    await store.close()
    reopened = SqliteTaskStore(tmp_path / "tasks.db")
    try:
        found = await reopened.get(task.id)
        assert found is not None and before is not None
        history = found[1].as_input()
        assert history == before[1].as_input()
        assert history["totals"] == {"amount": 49.0, "records": 0.0, "items": 2.0}
        assert history["by_tool"] == {"refund": 1}
        assert history["classifications_read"] == ["confidential"]
        assert history["external_hosts_written"] == ["hooks.example.com"]
        assert found[1].recent[0].measures == {"amount": 49, "items": 2}
    finally:
        await reopened.close()


async def test_replicas_share_one_history_in_redis(redis_server: Any) -> None:
    first, second = RedisTaskStore(redis_server.url), RedisTaskStore(redis_server.url)
    try:
        task = await first.create(agent="a", intent="refunds", labels={}, ttl_seconds=600, allowed_tools=[])
        for n, record in enumerate(history_calls() * 2):
            await (first if n % 2 else second).record(task.id, record)
        found = await second.get(task.id)
        assert found is not None
        history = found[1].as_input()
        assert history["calls"] == 6
        assert history["totals"] == {"amount": 98.0, "records": 0.0, "items": 4.0}
        assert history["external_hosts_written"] == ["hooks.example.com"]
    finally:
        await first.close()
        await second.close()


async def test_memory_store_stays_bounded_with_ten_thousand_live_tasks() -> None:
    store = MemoryTaskStore(max_tasks=10_000)
    expired = [await store.create(agent="a", intent="gone", labels={}, ttl_seconds=0, allowed_tools=[])
               for _ in range(3_000)]
    live = [await store.create(agent="a", intent=f"live {n}", labels={}, ttl_seconds=3600, allowed_tools=[])
            for n in range(10_000)]
    # Every expired task was evicted as soon as another was created, and all 10,000 live ones fit.
    assert len(store) == 10_000
    assert await store.get(expired[0].id) is None and await store.get(expired[-1].id) is None
    assert await store.get(live[0].id) is not None
    for record in history_calls():
        await store.record(live[0].id, record)
    extra = [await store.create(agent="a", intent="more", labels={}, ttl_seconds=3600, allowed_tools=[])
             for _ in range(500)]
    assert len(store) == 10_000  # past the bound the oldest live tasks go
    assert await store.get(live[0].id) is None and await store.get(live[499].id) is None
    assert await store.get(live[500].id) is not None and await store.get(extra[-1].id) is not None
    assert len(store._expiries) <= 2 * store.max_tasks  # the expiry index is bounded too


async def test_sqlite_store_holds_ten_thousand_tasks_and_prunes_old_ones(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    store = SqliteTaskStore(path)
    try:
        old = [await store.create(agent="a", intent="long gone", labels={}, ttl_seconds=-TASK_RETENTION_SECONDS - 60,
                                  allowed_tools=[]) for _ in range(200)]
        live = [await store.create(agent="a", intent=f"live {n}", labels={}, ttl_seconds=3600, allowed_tools=[])
                for n in range(10_000)]
        await store.record(live[0].id, history_calls()[0])
    finally:
        await store.close()
    restarted = SqliteTaskStore(path)  # prunes on its first write
    try:
        await restarted.create(agent="a", intent="after restart", labels={}, ttl_seconds=60, allowed_tools=[])
        assert await restarted.get(old[0].id) is None
        found = await restarted.get(live[0].id)
        assert found is not None and found[1].totals["amount"] == 49.0
    finally:
        await restarted.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM tasks").fetchone()[0] == 10_001


# ---------------------------------------------------------------- through a real sidecar


async def open_task(sc: RunningSidecar, intent: str) -> str:
    async with httpx.AsyncClient() as client:
        response = await client.post(f"{sc.admin}/v1/tasks", json={"intent": intent, "ttl_seconds": 600})
    assert response.status_code == 201, response.text
    task_id: str = response.json()["id"]
    return task_id


async def task_history(sc: RunningSidecar, task_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        history: dict[str, Any] = (await client.get(f"{sc.admin}/v1/tasks/{task_id}")).json()["history"]
    return history


def decision_inputs(sc: RunningSidecar) -> list[dict[str, Any]]:
    lines = sc.audit_path.read_text().splitlines()
    return [event["input"] for event in map(json.loads, lines) if event.get("type") == "decision" and event.get("input")]


async def test_twenty_small_refunds_in_one_task_are_held_past_the_task_total(make_sidecar: Any, echo_tool: EchoTool) -> None:
    sc = await make_sidecar(policy=SHIPPED)
    task = await open_task(sc, "refund duplicate charges")
    answers = []
    async with httpx.AsyncClient() as agent:
        for _ in range(20):  # unspaced: 10 allowed calls stay under the rate anomaly's 19 in 2 s
            answers.append(await agent.post(f"{sc.proxy}/payments/refunds", json={"amount": 49},
                                            headers={"X-Agent-Task": task}))
    assert [a.status_code for a in answers] == [200] * 10 + [403] * 10
    assert len(echo_tool.seen) == 10
    for held in answers[10:]:
        problem = held.json()
        assert problem["code"] == "approval_required" and problem["approval_id"]
        assert f"task_amount_threshold: amounts in task {task} total 539 > 500 (earlier 490 + this call 49)" in problem["reasons"]
        assert not any(r.startswith("amount_over_call_limit") for r in problem["reasons"])  # 49 is under the per-call 50
    history = await task_history(sc, task)
    assert history["calls"] == 20 and history["totals"]["amount"] == 490
    assert history["by_route"] == {"payments": 20} and history["by_method"] == {"POST": 20}
    assert [r["outcome"] for r in history["recent"]] == ["allow"] * 10 + ["hold"] * 10


async def test_route_measures_reach_the_history_and_the_policy(make_sidecar: Any, echo_tool: EchoTool,
                                                               tmp_path: Path) -> None:
    routes = copy.deepcopy(sidecar_config(tmp_path, echo_tool.base)["routes"])
    routes[1]["measures"] = {"amount": ["$.refund.amount"], "lines": ["$.lines#count"]}
    sc = await make_sidecar(policy=SHIPPED, routes=routes)
    task = await open_task(sc, "refund order lines")
    body = {"refund": {"amount": 49}, "lines": [{"sku": "a"}, {"sku": "b"}], "amount": 5000}
    async with httpx.AsyncClient() as agent:
        answers = [await agent.post(f"{sc.proxy}/payments/refunds", json=body, headers={"X-Agent-Task": task})
                   for _ in range(11)]
    # The route says the amount is refund.amount: the top-level 5000 is not an amount here.
    assert [a.status_code for a in answers] == [200] * 10 + [403]
    assert f"task_amount_threshold: amounts in task {task} total 539 > 500 (earlier 490 + this call 49)" in answers[-1].json()["reasons"]
    history = await task_history(sc, task)
    assert history["totals"] == {"amount": 490, "records": 0, "lines": 20}
    assert {json.dumps(i["request"]["measures"]) for i in decision_inputs(sc)} == {'{"amount": 49.0, "lines": 2.0}'}


async def test_sensitive_read_then_external_write_is_held(make_sidecar: Any, echo_tool: EchoTool, tmp_path: Path) -> None:
    routes = copy.deepcopy(sidecar_config(tmp_path, echo_tool.base)["routes"])
    routes.append({"name": "hooks", "match": {"path_prefix": "/hooks"}, "upstream": f"{echo_tool.base}/hooks",
                   "labels": {"external": True}})
    sc = await make_sidecar(policy=SHIPPED, routes=routes)
    task = await open_task(sc, "summarise customer 42")
    async with httpx.AsyncClient() as agent:
        read = await agent.get(f"{sc.proxy}/crm/customers/42", headers={"X-Agent-Task": task})
        write = await agent.post(f"{sc.proxy}/hooks/send", json={"text": "customer 42 ..."}, headers={"X-Agent-Task": task})
    assert read.status_code == 200
    assert write.status_code == 403 and write.json()["code"] == "approval_required"
    reasons = write.json()["reasons"]
    assert (f"exfiltration_chain: task {task} read confidential data earlier and POST /hooks/send on hooks now "
            "writes to external host 127.0.0.1") in reasons
    assert len(echo_tool.seen) == 1
    history = await task_history(sc, task)
    assert history["classifications_read"] == ["confidential"] and history["external_hosts_written"] == []


def test_the_policy_view_of_a_history_is_the_admin_view_reduced_as_input_v2_says() -> None:
    """The pipeline reads ``as_policy_input`` (v2 directly); it must be the admin API's view with ``recent``
    reduced as docs/policy.md says, reservations, odd timestamps and all outcomes included."""
    import time

    from sidecar.tasks.store import Reservation, Task, epoch_ms, iso_ms

    def reduced(task: dict[str, Any]) -> dict[str, Any]:
        """input v2's ``recent`` from v1's: per outcome, each call's time in Unix ms (0 if unreadable)."""
        recent = task["history"]["recent"]
        at_ms: dict[str, list[int]] = {}
        for entry in recent:
            at_ms.setdefault(entry["outcome"], []).append(epoch_ms(entry["at"]))
        return {**task, "history": {**task["history"], "recent": {"calls": len(recent), "at_ms": at_ms}}}

    now = time.time()
    summary = TaskSummary()
    for n, outcome in enumerate(["allow", "deny", "hold", "allow"] * 6):
        summary.add(call(outcome, at=iso_ms(now - 100 + n)))
    summary.add(call("allow", at="not a time"))
    summary.add(call("allow", at="2025-01-01T00:00:00"))  # no offset: never inside a window
    summary.reserve(Reservation("d-1", call("allow", at=iso_ms(now - 50.5)), now + 30))
    summary.reserve(Reservation("d-2", call("allow", at=iso_ms(now)), now - 1))  # expired: counted as completed
    task = Task(id="t-1", agent="a", intent="i", labels={"x": 1}, created_at=now - 200, expires_at=now + 200)
    policy = task.as_policy_input(summary)
    expected = reduced(task.as_input(summary))
    # ``allow`` holds the latest allowed calls, also those that held and denied calls pushed out of ``recent``.
    allowed = [*summary.recent_allowed, *(r.record for r in summary.reservations())]
    expected["history"]["recent"]["at_ms"]["allow"] = sorted(epoch_ms(r.at) for r in allowed)[-20:]
    assert policy == expected
    assert len(policy["history"]["recent"]["at_ms"]["allow"]) == 16  # 14 completed and 2 reservations
    assert policy["history"]["recent"]["calls"] == 20
    assert policy["history"]["in_flight"]["calls"] == 1
    assert policy["history"]["calls"] == 28 and task.as_input(summary)["history"]["recent"][-1]["state"] == "completed"
