"""The task's totals were summed from the sidecar's default measures ($.amount, $.records,
$.records#count), while the shipped library judged each call's amount and records from more places: the
query (amount, limit, per_page, page_size), each element of a JSON array body, and the records fields
limit, count, ids, items. A call the policy judged as moving 49 or touching 90 records adds 0 to its task,
so the task_amount / task_records totals never fire however many such calls are sent, at once or not.

Real parts: httpx as the agent, the embedded engine with the shipped rego/ library, one sidecar on SQLite
or two sidecars on one real redis-server (calls spread over both), the GateTool upstream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from approvals_support import eventually
from harness import open_task
from task_concurrency_support import Deployment, GateTool, deploy, task_history, tuned_policy

BACKENDS = ["sqlite", "redis"]


@pytest.fixture
async def deployment(request: pytest.FixtureRequest, tmp_path: Path, gate_tool: GateTool) -> AsyncIterator[Any]:
    started: list[Deployment] = []

    async def factory(backend: str) -> Deployment:
        redis_url = request.getfixturevalue("redis_server").url if backend == "redis" else None
        running = await deploy(backend, tmp_path, gate_tool.base, tuned_policy(tmp_path), redis_url)
        started.append(running)
        return running

    yield factory
    for running in started:
        await running.stop()


@dataclass(frozen=True)
class Shape:
    method: str
    path: str
    body: Any
    admits: int
    over_path: str  # the same shape past the per-call limit: held, which shows the policy reads it there
    over_body: Any  # what the shipped library lets one task do (task_amount 500 / task_records 1000)


SHAPES = {
    # 49 a call (per-call limit 50), as the policy reads it: ten fit in the task's 500.
    "amount_in_query": Shape("POST", "/payments/refunds?amount=49", {"memo": "duplicate charge"}, admits=10,
                             over_path="/payments/refunds?amount=60", over_body={"memo": "duplicate charge"}),
    "amount_in_array_body": Shape("POST", "/payments/refunds", [{"amount": 49}], admits=10,
                                  over_path="/payments/refunds", over_body=[{"amount": 60}]),
    # 90 records a call (per-call limit 100), as the policy reads it: eleven fit in the task's 1000.
    "records_in_query_limit": Shape("GET", "/crm/customers?limit=90", None, admits=11,
                                    over_path="/crm/customers?limit=120", over_body=None),
    "records_in_ids": Shape("POST", "/crm/exports", {"ids": list(range(90))}, admits=11,
                            over_path="/crm/exports", over_body={"ids": list(range(120))}),
    "records_in_count": Shape("POST", "/crm/exports", {"count": 90}, admits=11,
                              over_path="/crm/exports", over_body={"count": 120}),
}
CALLS = 16


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
async def test_a_task_total_counts_what_the_policy_judged(backend: str, shape_name: str, deployment: Any,
                                                          gate_tool: GateTool) -> None:
    shape = SHAPES[shape_name]
    running = await deployment(backend)
    task = await open_task(running.admin, "refund and export customer data")
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=CALLS)) as agent:
        probe_task = await open_task(running.admin, "refund and export customer data")
        probe = await agent.request(shape.method, f"{running.proxy(0)}{shape.over_path}", json=shape.over_body,
                                    headers={"X-Agent-Task": probe_task})
        assert probe.status_code == 403 and probe.json()["code"] == "approval_required", probe.text
        answers = await asyncio.gather(*(
            agent.request(shape.method, f"{running.proxy(n)}{shape.path}", json=shape.body,
                          headers={"X-Agent-Task": task}) for n in range(CALLS)))
    statuses = [a.status_code for a in answers]

    async def settled() -> dict[str, Any] | None:
        found = await task_history(running.admin, task)
        return found if found["in_flight"]["calls"] == 0 else None

    history = await eventually(settled, what="every allowed call confirmed")
    # Nothing past the task's total reached the upstream.
    assert statuses.count(200) <= shape.admits, (statuses, history["totals"])
