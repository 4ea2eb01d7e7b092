"""An MCP batch was decided message by message, each against the task's history without the
batch's other messages, and then counted once with the sum of all of them: a batch of small tools/call
messages moved a total the policy enforces past its cap in one call, on either backend. A batch now
carries at most one request.

Real parts: httpx as the agent, the embedded engine with the shipped rego/ library, one sidecar on SQLite
or two sidecars on one real redis-server, the GateTool upstream."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from approvals_support import eventually
from harness import open_task
from task_concurrency_support import GateTool, task_history

BACKENDS = ["sqlite", "redis"]


def mcp_route(upstream: str) -> dict[str, Any]:
    return {"name": "refunds", "match": {"path_prefix": "/mcp"}, "upstream": f"{upstream}/mcp",
            "labels": {"protocol": "mcp", "environment": "dev"}}


def refund(request_id: int, amount: float) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
            "params": {"name": "refund", "arguments": {"amount": amount}}}


@pytest.mark.parametrize("backend", BACKENDS)
async def test_an_mcp_batch_cannot_move_more_than_the_task_amount(backend: str, deployment: Any,
                                                                  gate_tool: GateTool) -> None:
    running = await deployment(backend, extra_routes=[mcp_route(gate_tool.base)])
    task = await open_task(running.admin, "refund duplicate charges")
    headers = {"X-Agent-Task": task}
    async with httpx.AsyncClient(timeout=60) as agent:
        # One refund of 49 alone: under the per-call limit (50) and the task's total (500).
        single = await agent.post(f"{running.proxy(0)}/mcp", json=refund(0, 49), headers=headers)
        assert single.status_code == 200, single.text
        # Eleven refunds of 49 in one batch: 539 more, 588 in the task, past its total of 500.
        batch = await agent.post(f"{running.proxy(1)}/mcp", json=[refund(i, 49) for i in range(1, 12)],
                                 headers=headers)

    async def settled() -> dict[str, Any] | None:
        found = await task_history(running.admin, task)
        return found if found["in_flight"]["calls"] == 0 else None

    history = await eventually(settled, what="every allowed call confirmed")
    forwarded = [a for a in gate_tool.arrivals if a.path.startswith("/mcp")]
    # The invariant: a task never moves more than limits.task_amount (500) through allowed calls.
    assert history["totals"]["amount"] <= 500, (batch.status_code, batch.text[:300], history["totals"], len(forwarded))


def lookup(request_id: int) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
            "params": {"name": "lookup_customer", "arguments": {"id": request_id}}}


@pytest.mark.parametrize("backend", BACKENDS)
async def test_an_mcp_batch_cannot_pass_the_task_call_cap(backend: str, deployment: Any, gate_tool: GateTool,
                                                           tmp_path: Path) -> None:
    # A hard cap of 6 calls per task (task_call_cap): each tools/call in a batch is decided as "this call" on
    # the history as it was before the batch, and the batch then counts as one call.
    data = tmp_path / "rego" / "data.json"
    running = await deployment(backend, anomalies={"max_calls_per_task": 6}, extra_routes=[mcp_route(gate_tool.base)])
    assert '"max_calls_per_task": 6' in data.read_text()
    task = await open_task(running.admin, "look up customers")
    async with httpx.AsyncClient(timeout=60) as agent:
        batches = [await agent.post(f"{running.proxy(n)}/mcp", json=[lookup(n * 32 + i) for i in range(32)],
                                    headers={"X-Agent-Task": task}) for n in range(3)]
    decided = [e for e in running.audit_events() if e.get("type") == "decision" and e.get("task_id") == task
               and e.get("outcome") == "allow"]
    # Every allowed decision is one tools/call that reached the tool: at most 6 in the task.
    assert len(decided) <= 6, ([b.status_code for b in batches], len(decided))
