"""Issue 15, item 2: the record of a forwarded call always completes.

Whatever the agent does with its connection, and whether or not the task store answers after the
call went out, the audit chain gets the upstream's event, the metrics count the call and the task
history records it; a store failure after forwarding is recorded as what it is, never as a refusal.
Real parts: a raw socket or httpx as the agent, a real sidecar, a real redis-server.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from approvals_support import eventually
from harness import RunningSidecar, open_task, start_sidecar
from task_concurrency_support import GateTool, deployment_config, task_history, tuned_policy


@pytest.fixture
async def sidecars() -> AsyncIterator[list[RunningSidecar]]:
    started: list[RunningSidecar] = []
    yield started
    for running in started:
        await running.sidecar.stop()


async def start(tmp_path: Path, gate_tool: GateTool, sidecars: list[RunningSidecar],
                redis_url: str | None = None) -> RunningSidecar:
    config = deployment_config(tmp_path / "sidecar", gate_tool.base, tuned_policy(tmp_path), redis_url)
    running = await start_sidecar(tmp_path / "sidecar", config)
    sidecars.append(running)
    return running


def audit(running: RunningSidecar) -> list[dict[str, Any]]:
    return [json.loads(line) for line in running.audit_path.read_text().splitlines() if line.strip()]


def for_decision(events: list[dict[str, Any]], decision_id: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("decision_id") == decision_id]


async def metric(running: RunningSidecar, name: str) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{running.metrics}/metrics")).text
    found = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def test_an_agent_that_hangs_up_mid_call_still_leaves_the_whole_record(tmp_path: Path, gate_tool: GateTool,
                                                                             sidecars: list[RunningSidecar]) -> None:
    running = await start(tmp_path, gate_tool, sidecars)
    task = await open_task(running.admin, "refund duplicate charges")
    body = b'{"amount": 49}'
    reader, writer = await asyncio.open_connection("127.0.0.1", running.sidecar.config.proxy.port)
    writer.write(b"POST /slowpay/refunds HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"X-Agent-Task: {task}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    await writer.drain()
    [arrival] = await gate_tool.wait_at_gate(1)
    assert arrival.decision_id
    writer.close()  # the agent hangs up while the upstream is still working
    await writer.wait_closed()
    history = await task_history(running.admin, task)
    assert history["in_flight"]["calls"] == 1 and history["totals"]["amount"] == 49

    async def orphaned(count: int) -> bool:
        return running.sidecar.path.orphaned == count

    # The handler was cancelled; the forwarding goes on, and still counts against the in-flight limit.
    await eventually(lambda: orphaned(1), what="the handler cancelled, its call still in flight")
    gate_tool.gate.set()  # now the upstream answers, to nobody

    async def recorded() -> dict[str, Any] | None:
        found = await task_history(running.admin, task)
        return found if found["in_flight"]["calls"] == 0 and found["calls"] == 1 else None

    history = await eventually(recorded, what="the call confirmed in the task history")
    assert history["totals"]["amount"] == 49 and history["recent"][-1]["state"] == "completed"

    async def upstream_event() -> dict[str, Any] | None:
        return next((e for e in for_decision(audit(running), arrival.decision_id) if e["type"] == "upstream"), None)

    event = await eventually(upstream_event, what="the upstream event in the audit chain")
    assert event["task_id"] == task and event["route"] == "slowpay"
    kinds = [e["type"] for e in for_decision(audit(running), arrival.decision_id)]
    assert "reservation.released" not in kinds and "refusal" not in kinds
    assert await metric(running, 'agent_sidecar_requests_total{outcome="allowed",route="slowpay"}') == 1
    await eventually(lambda: orphaned(0), what="the orphaned call to finish")


async def test_redis_killed_while_a_call_is_at_the_upstream(tmp_path: Path, gate_tool: GateTool,
                                                            sidecars: list[RunningSidecar], redis_server: Any) -> None:
    running = await start(tmp_path, gate_tool, sidecars, redis_url=redis_server.url)
    task = await open_task(running.admin, "refund duplicate charges")
    async with httpx.AsyncClient(timeout=60) as agent:
        answer = asyncio.ensure_future(agent.post(f"{running.proxy}/slowpay/refunds", json={"amount": 49},
                                                  headers={"X-Agent-Task": task}))
        [arrival] = await gate_tool.wait_at_gate(1)
        redis_server.stop()  # the store dies while the call is at the upstream
        gate_tool.gate.set()
        response = await answer
    assert response.status_code == 200 and response.json()["path"] == "/gate/payments/refunds"
    decision_id = arrival.decision_id
    assert decision_id

    async def record_failed() -> list[dict[str, Any]] | None:
        events = for_decision(audit(running), decision_id)
        return events if any(e["type"] == "record.failed" for e in events) else None

    events = await eventually(record_failed, what="record.failed in the audit chain")
    decisions = [e for e in events if e["type"] == "decision"]
    assert [d["outcome"] for d in decisions] == ["allow"]  # never "refused store_unavailable" under this id
    assert [e["status"] for e in events if e["type"] == "upstream"] == [200]
    [failed] = [e for e in events if e["type"] == "record.failed"]
    assert failed["record"] == "task_history" and failed["task_id"] == task and failed["retry"] == "background"
    assert not any(e["type"] == "refusal" for e in audit(running))
    assert await metric(running, 'agent_sidecar_refusals_total{code="store_unavailable"}') == 0
    assert await metric(running, 'agent_sidecar_record_failures_total{record="task_history"}') == 1
    assert await metric(running, "agent_sidecar_record_backlog") == 1
    assert await metric(running, 'agent_sidecar_requests_total{outcome="allowed",route="slowpay"}') == 1
    async with httpx.AsyncClient() as client:
        ready = await client.get(f"{running.metrics}/readyz")
    assert ready.status_code == 503 and "task_history" in ready.json()["failing"]

    redis_server.start()  # an empty Redis (no persistence in the test): the write finds no task and is done

    async def recovered() -> bool:
        kinds = [e["type"] for e in for_decision(audit(running), decision_id)]
        return "record.recovered" in kinds

    await eventually(recovered, what="the queued record written once Redis answers")
    assert await metric(running, "agent_sidecar_record_backlog") == 0

    async def task_history_ready() -> bool:
        async with httpx.AsyncClient() as client:
            checks = (await client.get(f"{running.metrics}/readyz")).json()["checks"]
        return bool(checks["task_history"]["ok"])

    await eventually(task_history_ready, what="/readyz task_history green again")


async def test_the_queued_record_lands_in_the_history_once_redis_is_back(tmp_path: Path, gate_tool: GateTool,
                                                                          sidecars: list[RunningSidecar],
                                                                          redis_server: Any) -> None:
    """Redis keeps its data here (paused, not restarted): the confirmed call reaches the history after all."""
    running = await start(tmp_path, gate_tool, sidecars, redis_url=redis_server.url)
    task = await open_task(running.admin, "refund duplicate charges")
    assert redis_server.process is not None
    async with httpx.AsyncClient(timeout=60) as agent:
        answer = asyncio.ensure_future(agent.post(f"{running.proxy}/slowpay/refunds", json={"amount": 49},
                                                  headers={"X-Agent-Task": task}))
        await gate_tool.wait_at_gate(1)
        redis_server.process.send_signal(19)  # SIGSTOP: Redis stops answering, its data stays
        try:
            gate_tool.gate.set()
            response = await answer
            assert response.status_code == 200

            async def queued() -> bool:
                return await metric(running, "agent_sidecar_record_backlog") == 1

            await eventually(queued, what="the record queued while Redis does not answer")
        finally:
            redis_server.process.send_signal(18)  # SIGCONT

    async def confirmed() -> dict[str, Any] | None:
        history = await task_history(running.admin, task)
        return history if history["in_flight"]["calls"] == 0 and history["calls"] == 1 else None

    history = await eventually(confirmed, what="the queued record in the task history")
    assert history["totals"]["amount"] == 49


async def test_a_call_counts_in_its_task_as_answered_while_an_agent_that_reads_slowly_gets_the_answer(
        tmp_path: Path, sidecars: list[RunningSidecar]) -> None:
    """An agent that stops reading its answer keeps the relay going past the route's timeout: the call must
    already be in its task's completed history then, never only in a reservation that expires under it
    (its limits would stop counting a call the upstream carried out)."""
    import socket

    from aiohttp import web

    from harness import serve_app

    answer = b"x" * (16 * 1024 * 1024)  # far more than the sockets in between hold

    async def big(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=answer)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", big)
    runner, port = await serve_app(app)
    try:
        config = deployment_config(tmp_path / "sidecar", f"http://127.0.0.1:{port}", tuned_policy(tmp_path), None)
        running = await start_sidecar(tmp_path / "sidecar", config)
        sidecars.append(running)
        task = await open_task(running.admin, "refund duplicate charges")
        body = b'{"amount": 49}'
        reader, writer = await asyncio.open_connection("127.0.0.1", running.sidecar.config.proxy.port)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        writer.write(b"POST /payments/refunds HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + f"X-Agent-Task: {task}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        writer.transport.pause_reading()  # the agent does not read its answer

        async def confirmed() -> dict[str, Any] | None:
            history = await task_history(running.admin, task)
            return history if history["calls"] == 1 else None

        history = await eventually(confirmed, what="the call in the task's completed history")
        assert history["totals"]["amount"] == 49 and history["in_flight"]["calls"] == 0
        assert running.sidecar.path.in_flight == 1  # the answer is still being relayed
        writer.close()
    finally:
        await runner.cleanup()


async def test_a_store_that_fails_in_an_unforeseen_way_after_the_call_went_out_is_recorded_not_refused(
        tmp_path: Path, gate_tool: GateTool, sidecars: list[RunningSidecar]) -> None:
    """Not a store_unavailable refusal but any exception: the forwarded call's answer stands and its record is
    audited as failed and queued for a retry."""
    running = await start(tmp_path, gate_tool, sidecars)
    task = await open_task(running.admin, "refund duplicate charges")

    async def unforeseen(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the worker lane is stopped")

    async with httpx.AsyncClient(timeout=60) as agent:
        answer = asyncio.ensure_future(agent.post(f"{running.proxy}/slowpay/refunds", json={"amount": 49},
                                                  headers={"X-Agent-Task": task}))
        [arrival] = await gate_tool.wait_at_gate(1)
        # A stand-in (no real fault makes the store raise this): what its stopped writer thread raised when the
        # store had a thread of its own. The disk thread is now shared with the audit chain, which must live on.
        running.sidecar.path.tasks.confirm = unforeseen  # type: ignore[method-assign]
        gate_tool.gate.set()
        response = await answer
    assert response.status_code == 200 and response.json()["path"] == "/gate/payments/refunds"

    async def record_failed() -> list[dict[str, Any]] | None:
        events = for_decision(audit(running), arrival.decision_id or "")
        return events if any(e["type"] == "record.failed" for e in events) else None

    events = await eventually(record_failed, what="record.failed in the audit chain")
    [failed] = [e for e in events if e["type"] == "record.failed"]
    assert failed["error"] == "the task store failed (RuntimeError)" and failed["retry"] == "background"
    assert [d["outcome"] for d in events if d["type"] == "decision"] == ["allow"]
    assert await metric(running, "agent_sidecar_record_backlog") == 1
