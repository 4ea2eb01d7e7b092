"""Issue 14: a sidecar killed with kill -9 in the middle of reservations leaves no task stuck, and loses no
confirmed call. A real `agent-sidecar run --config FILE` subprocess, on SQLite or on a real redis-server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from approvals_support import eventually
from harness import open_task
from task_concurrency_support import GateTool, deployment_config, task_history, tuned_policy
from test_approvals_durable import SidecarProcess, listener_url, processes, start_process  # noqa: F401 - the fixture is used below

# The route's upstream timeout: its reservations expire 5 s + the margin after their decision.
GATE_TIMEOUT_SECONDS = 5.0


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_kill_9_mid_reservation_leaves_no_task_stuck_and_forgets_no_allowed_call(
        backend: str, request: pytest.FixtureRequest, tmp_path: Path, gate_tool: GateTool,
        processes: list[SidecarProcess]) -> None:  # noqa: F811 - the fixture imported above
    redis_url = request.getfixturevalue("redis_server").url if backend == "redis" else None
    config = deployment_config(tmp_path / "sidecar", gate_tool.base, tuned_policy(tmp_path), redis_url,
                               gate_timeout_seconds=GATE_TIMEOUT_SECONDS)
    config_path = tmp_path / "sidecar.yaml"

    def url(listener: str) -> str:
        return listener_url(config, listener)

    async def started(name: str) -> SidecarProcess:
        return await start_process(config, config_path, tmp_path / name, processes)

    first = await started("first")
    task = await open_task(url("admin"), "refund duplicate charges")
    async with httpx.AsyncClient(timeout=60) as agent:
        refund: dict[str, Any] = {"json": {"amount": 49}, "headers": {"X-Agent-Task": task}}
        confirmed = [await agent.post(f"{url('proxy')}/payments/refunds", **refund) for _ in range(3)]
        assert [r.status_code for r in confirmed] == [200] * 3
        in_flight = [asyncio.ensure_future(agent.post(f"{url('proxy')}/slowpay/refunds", **refund)) for _ in range(7)]
        await gate_tool.wait_at_gate(7)  # seven refunds allowed, reserved, and at an upstream that never answers
        history = await task_history(url("admin"), task)
        assert history["in_flight"] == {"calls": 7, "totals": {"amount": 343.0, "records": 0.0}}
        assert history["totals"]["amount"] == 490 and history["calls"] == 10
        first.kill_9()
        lost = await asyncio.gather(*in_flight, return_exceptions=True)
        assert all(isinstance(r, httpx.HTTPError) for r in lost)

    await started("second")
    history = await task_history(url("admin"), task)
    # The dead sidecar's reservations count, in flight until they expire and as completed calls after: never less.
    assert (history["in_flight"]["calls"], history["totals"]["amount"], history["calls"]) in [(7, 490, 10), (0, 490, 10)]

    async def expired() -> dict[str, Any] | None:
        found = await task_history(url("admin"), task)
        return found if found["in_flight"]["calls"] == 0 else None

    history = await eventually(expired, deadline=60, what="the dead sidecar's reservations to expire")
    # Fail closed: each of the seven reached its upstream, which may have acted, so they count as completed.
    assert history["totals"]["amount"] == 490 and history["calls"] == 10
    assert [r["state"] for r in history["recent"]] == ["completed"] * 10
    async with httpx.AsyncClient(timeout=60) as agent:
        after = await agent.post(f"{url('proxy')}/payments/refunds", json={"amount": 5}, headers={"X-Agent-Task": task})
        assert after.status_code == 200, after.text  # the task is not stuck
        over = await agent.post(f"{url('proxy')}/payments/refunds", json={"amount": 49}, headers={"X-Agent-Task": task})
        assert over.status_code != 200  # 495 + 49 passes the task's 500: the expired calls still count
    assert (await task_history(url("admin"), task))["totals"]["amount"] == 495
