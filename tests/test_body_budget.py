"""limits.max_body_bytes_in_flight: the bodies of every call in flight, together, are bounded.

A parsed JSON body can take ~25 times its bytes, so max_in_flight calls of max_body_bytes each could hold
far more than the pod has. Real parts: a real sidecar, httpx and a raw socket as the agent, an upstream
that holds calls at a gate (tests/task_concurrency_support.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from approvals_support import eventually
from harness import RunningSidecar, open_task, start_sidecar
from task_concurrency_support import GateTool, deployment_config, tuned_policy

BODY_LIMIT = 4096
IN_FLIGHT_LIMIT = 10_000


@pytest.fixture
async def running(tmp_path: Path, gate_tool: GateTool) -> AsyncIterator[RunningSidecar]:
    config = deployment_config(tmp_path / "sidecar", gate_tool.base, tuned_policy(tmp_path), None)
    config["limits"] = {"max_body_bytes": BODY_LIMIT, "max_body_bytes_in_flight": IN_FLIGHT_LIMIT}
    started = await start_sidecar(tmp_path / "sidecar", config)
    yield started
    await started.sidecar.stop()


def refund(size: int) -> bytes:
    """A refund of 1 whose JSON body is exactly ``size`` bytes."""
    empty = len(json.dumps({"amount": 1, "memo": ""}))
    return json.dumps({"amount": 1, "memo": "x" * (size - empty)}).encode()


def charged(running: RunningSidecar) -> int:
    return running.sidecar.path.interceptor.bodies.used


async def all_given_back(running: RunningSidecar) -> None:
    """The answer is relayed before its handler ends (it waits for the call's confirmation after relaying)."""
    async def zero() -> bool:
        return charged(running) == 0

    await eventually(zero, what="every body given back")


async def post(agent: httpx.AsyncClient, running: RunningSidecar, path: str, body: bytes) -> httpx.Response:
    task = await open_task(running.admin, "refund duplicate charges")
    return await agent.post(f"{running.proxy}{path}", content=body,
                            headers={"X-Agent-Task": task, "Content-Type": "application/json"})


async def test_a_body_past_what_the_calls_in_flight_leave_is_refused_until_they_end(
        running: RunningSidecar, gate_tool: GateTool) -> None:
    async with httpx.AsyncClient(timeout=60) as agent:
        held = [asyncio.ensure_future(post(agent, running, "/slowpay/refunds", refund(4000))) for _ in range(2)]
        await gate_tool.wait_at_gate(2)
        assert charged(running) == 8000
        refused = await post(agent, running, "/payments/refunds", refund(4000))
        small = await post(agent, running, "/payments/refunds", refund(1000))  # what is left still serves
        gate_tool.gate.set()
        answers = await asyncio.gather(*held)
        after = await post(agent, running, "/payments/refunds", refund(4000))
    assert refused.status_code == 503 and refused.json()["code"] == "overloaded"
    assert refused.headers["Retry-After"] == "1" and "max_body_bytes_in_flight" in refused.json()["detail"]
    assert small.status_code == 200 and [a.status_code for a in answers] == [200, 200] and after.status_code == 200
    await all_given_back(running)
    assert len(gate_tool.arrivals) == 4  # the refused one never reached the upstream


async def test_an_agent_that_hangs_up_leaves_its_body_charged_until_the_forwarding_ends(
        running: RunningSidecar, gate_tool: GateTool) -> None:
    task = await open_task(running.admin, "refund duplicate charges")
    body = refund(3000)
    reader, writer = await asyncio.open_connection("127.0.0.1", running.sidecar.config.proxy.port)
    writer.write(b"POST /slowpay/refunds HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"X-Agent-Task: {task}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    await writer.drain()
    await gate_tool.wait_at_gate(1)
    writer.close()
    await writer.wait_closed()

    async def orphaned() -> bool:
        return running.sidecar.path.orphaned == 1

    await eventually(orphaned, what="the handler cancelled, its call still forwarded")
    assert charged(running) == 3000  # the forwarding still holds the body
    gate_tool.gate.set()

    async def given_back() -> bool:
        return running.sidecar.path.orphaned == 0 and charged(running) == 0

    await eventually(given_back, what="the body given back when the forwarding ended")


async def test_a_chunked_body_is_charged_as_it_arrives(running: RunningSidecar, gate_tool: GateTool) -> None:
    async with httpx.AsyncClient(timeout=60) as agent:
        held = [asyncio.ensure_future(post(agent, running, "/slowpay/refunds", refund(4000))) for _ in range(2)]
        await gate_tool.wait_at_gate(2)
        task = await open_task(running.admin, "refund duplicate charges")
        body = refund(3000)
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:1000], body[1000:2000], body[2000:]))
        reader, writer = await asyncio.open_connection("127.0.0.1", running.sidecar.config.proxy.port)
        writer.write(b"POST /payments/refunds HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + f"X-Agent-Task: {task}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode()
                     + chunks + b"0\r\n\r\n")
        await writer.drain()
        answer = await reader.read()
        writer.close()
        gate_tool.gate.set()
        await asyncio.gather(*held)
    assert answer.startswith(b"HTTP/1.1 503") and b'"overloaded"' in answer
    await all_given_back(running)


async def test_refused_calls_give_their_bodies_back(running: RunningSidecar, gate_tool: GateTool) -> None:
    async with httpx.AsyncClient(timeout=60) as agent:
        for body in (b'{"amount": 1, "amount": 2}', b"[" * 200 + b"]" * 200, b"x" * (BODY_LIMIT + 1), refund(4000)):
            response = await post(agent, running, "/payments/refunds", body)
            assert response.status_code in (200, 400, 413)
        gzipped = await agent.post(f"{running.proxy}/payments/refunds", content=b"\x1f\x8b" + b"0" * 100,
                                   headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
    assert gzipped.status_code == 415
    await all_given_back(running)
