"""Issue 14: the cumulative rules of a task cannot be raced by sending its calls at once.

Real parts throughout: httpx as the agent, real sockets, the embedded OPA engine with the
shipped rego/ library (thresholds tuned through its data where a test needs it), SQLite
with one sidecar and a real redis-server shared by two sidecars. Concurrency is real
(asyncio.gather of HTTP calls); nothing waits on a sleep or asserts a duration.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from approvals_support import eventually
from harness import open_task
from task_concurrency_support import LOOPBACK_IS_EXTERNAL, Deployment, GateTool, task_history

BACKENDS = ["sqlite", "redis"]

Deploy = Callable[..., Awaitable[Deployment]]


async def call_at_once(deployment: Deployment, count: int, method: str, path: str, task_id: str,
                       body: Any = None) -> list[httpx.Response]:
    """``count`` calls of one task sent together, spread over the deployment's sidecars."""
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=count)) as agent:
        return list(await asyncio.gather(*(
            agent.request(method, f"{deployment.proxy(n)}{path}", json=body, headers={"X-Agent-Task": task_id})
            for n in range(count))))


@dataclass(frozen=True)
class Limit:
    method: str
    path: str
    body: Any
    anomalies: dict[str, Any]
    admits: int  # how many calls of one task the limit lets through
    calls: int


LIMITS = {
    # Task total 500, per call 50: ten refunds of 49, then held (task_amount_threshold).
    "amount": Limit("POST", "/payments/refunds", {"amount": 49}, {}, admits=10, calls=15),
    # Task total 1000 records, per call 100: eleven exports of 90, then held (task_records_threshold).
    "records": Limit("POST", "/crm/exports", {"records": 90}, {}, admits=11, calls=15),
    # A hard cap of 6 calls per task, then denied and the task revoked (task_call_cap).
    "call_cap": Limit("GET", "/crm/customers/42", None, {"max_calls_per_task": 6}, admits=6, calls=12),
    # At most 5 calls in the (here one hour long) rate window, then denied and revoked (task_request_rate).
    "rate_window": Limit("GET", "/crm/customers/42", None, {"rate_window_seconds": 3600, "max_calls_in_window": 5},
                         admits=5, calls=12),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("limit_name", list(LIMITS))
async def test_calls_sent_at_once_never_pass_a_task_limit(backend: str, limit_name: str, deployment: Deploy,
                                                          gate_tool: GateTool) -> None:
    limit = LIMITS[limit_name]
    running = await deployment(backend, limit.anomalies)
    task = await open_task(running.admin, "refund and export customer data")
    answers = await call_at_once(running, limit.calls, limit.method, limit.path, task, limit.body)
    statuses = [a.status_code for a in answers]
    allowed = statuses.count(200)
    contended = [a for a in answers if a.status_code == 503]
    assert all(a.json()["code"] == "task_contended" for a in contended), [a.text for a in contended]
    assert allowed <= limit.admits, statuses
    assert len(gate_tool.arrivals) == allowed  # nothing past the limit reached the upstream
    if not contended:
        assert allowed == limit.admits, statuses
    refused = [a.json() for a in answers if a.status_code not in (200, 503)]
    assert refused and all(r["code"] in ("approval_required", "denied", "unknown_task") for r in refused), refused
    # The agent has its answer as soon as it is relayed; the record settles right after it: wait for that.
    async def settled() -> dict[str, Any] | None:
        found = await task_history(running.admin, task)
        return found if found["in_flight"]["calls"] == 0 else None

    history = await eventually(settled, what="every allowed call confirmed")
    assert history["in_flight"] == {"calls": 0, "totals": {}}  # every allowed call answered and confirmed
    assert [r["state"] for r in history["recent"]] == ["completed"] * len(history["recent"])
    if limit_name == "amount":
        assert history["totals"]["amount"] == 49 * allowed
    if limit_name == "records":
        assert history["totals"]["records"] == 90 * allowed


@pytest.mark.parametrize("backend", BACKENDS)
async def test_an_external_write_while_a_sensitive_read_is_in_flight_is_held(backend: str, deployment: Deploy,
                                                                             gate_tool: GateTool) -> None:
    running = await deployment(backend, **LOOPBACK_IS_EXTERNAL)
    task = await open_task(running.admin, "summarise customer 42")
    async with httpx.AsyncClient(timeout=60) as agent:
        read = asyncio.ensure_future(agent.get(f"{running.proxy(0)}/slowcrm/customers/42", headers={"X-Agent-Task": task}))
        await gate_tool.wait_at_gate(1)  # the read was allowed and is at the upstream, not yet answered
        history = await task_history(running.admin, task)
        assert history["in_flight"]["calls"] == 1 and history["classifications_read"] == ["confidential"]
        assert history["recent"][-1]["state"] == "reserved" and history["recent"][-1]["outcome"] == "allow"
        write = await agent.post(f"{running.proxy(1)}/hooks/send", json={"text": "customer 42 ..."},
                                 headers={"X-Agent-Task": task})
        gate_tool.gate.set()
        assert (await read).status_code == 200
    assert write.status_code == 403 and write.json()["code"] == "approval_required", write.text
    assert [r.split(":")[0] for r in write.json()["reasons"]] == ["exfiltration_chain"]  # held for the chain alone
    assert [a.path for a in gate_tool.arrivals] == ["/gate/crm/customers/42"]


def decisions_of(events: list[dict[str, Any]], task_id: str, route: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("type") == "decision" and e.get("task_id") == task_id and e.get("route") == route
            and e.get("outcome") != "superseded"]


def saw(decision: dict[str, Any], route: str) -> bool:
    return bool(decision["input"]["task"]["history"]["by_route"].get(route))


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_read_and_an_external_write_sent_together_are_decided_one_after_the_other(
        backend: str, deployment: Deploy, gate_tool: GateTool) -> None:
    running = await deployment(backend, **LOOPBACK_IS_EXTERNAL)
    tasks = [await open_task(running.admin, "summarise customer 42") for _ in range(8)]
    async with httpx.AsyncClient(timeout=60) as agent:
        pairs = await asyncio.gather(*(asyncio.gather(
            agent.get(f"{running.proxy(0)}/crm/customers/42", headers={"X-Agent-Task": task}),
            agent.post(f"{running.proxy(1)}/hooks/send", json={"text": "customer 42 ..."}, headers={"X-Agent-Task": task}),
        ) for task in tasks))

    async def both_decisions_audited() -> list[dict[str, Any]] | None:
        events = running.audit_events()
        complete = all(decisions_of(events, t, "crm") and decisions_of(events, t, "hooks") for t in tasks)
        return events if complete else None

    events = await eventually(both_decisions_audited, deadline=30, what="every decision in the audit chain")
    for task, (read, write) in zip(tasks, pairs, strict=True):
        assert read.status_code == 200, read.text
        [read_decision], [write_decision] = decisions_of(events, task, "crm"), decisions_of(events, task, "hooks")
        # Serialised: whichever was decided second saw the first (in flight or completed).
        assert saw(write_decision, "crm") or saw(read_decision, "hooks"), json.dumps([write_decision, read_decision])
        if saw(write_decision, "crm"):
            assert write.status_code == 403 and write.json()["code"] == "approval_required", write.text
            assert any(r.startswith("exfiltration_chain:") for r in write.json()["reasons"])
        else:
            assert write.status_code == 200, write.text


async def test_failed_attempts_are_audited_as_superseded_never_as_allow(deployment: Deploy, gate_tool: GateTool) -> None:
    running = await deployment("redis")
    task = await open_task(running.admin, "refund duplicate charges")
    answers = await call_at_once(running, 16, "POST", "/payments/refunds", task, {"amount": 1})  # under the rate cap
    allowed_ids = {a.decision_id for a in gate_tool.arrivals}
    assert len(allowed_ids) == [a.status_code for a in answers].count(200)

    async def decisions() -> list[dict[str, Any]] | None:
        found = [e for e in running.audit_events() if e.get("type") == "decision" and e.get("outcome") != "superseded"]
        return found if len(found) >= len(answers) else None

    await eventually(decisions, deadline=30, what="a decision event per call")
    events = running.audit_events()
    allow_ids = {e["decision_id"] for e in events if e.get("type") == "decision" and e.get("outcome") == "allow"}
    assert allow_ids == allowed_ids  # only the decisions that reserved and went out are audited as allow
    for event in events:
        if event.get("outcome") == "superseded":
            assert event["decision_id"] not in allowed_ids and event["code"] == "task_contended"


async def test_a_call_waiting_for_its_approval_does_not_hold_up_its_task(deployment: Deploy, gate_tool: GateTool) -> None:
    running = await deployment("sqlite")
    task = await open_task(running.admin, "clean up customer records")
    async with httpx.AsyncClient(timeout=60) as agent:
        held = asyncio.ensure_future(agent.delete(f"{running.proxy()}/crm/customers/42",
                                                  headers={"X-Agent-Task": task, "Prefer": "wait=30"}))

        async def waiting_for_a_human() -> bool:
            return any(e.get("type") == "approval.requested" and e.get("task_id") == task for e in running.audit_events())

        await eventually(waiting_for_a_human, what="the DELETE to wait for its approval")
        read = await agent.get(f"{running.proxy()}/crm/customers/7", headers={"X-Agent-Task": task})
        assert read.status_code == 200
        assert not held.done()  # the read of the same task was decided while the DELETE still waits
        held.cancel()
