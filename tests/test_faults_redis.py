"""Issue 15, item 5: after a Redis restart, no call is refused once Redis answers again, and /readyz says so.

A real sidecar on a real redis-server (tasks, credentials and approvals shared there), its pooled
connections opened by concurrent calls, then Redis stopped and started on the same port.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from approvals_support import eventually
from harness import SidecarFactory
from harness import RunningSidecar


async def readyz(sc: RunningSidecar, status: int) -> dict[str, Any] | None:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{sc.metrics}/readyz")
    return response.json() if response.status_code == status else None


async def calls(sc: RunningSidecar, count: int, task: str | None = None) -> list[httpx.Response]:
    headers = {"X-Agent-Task": task} if task else {}
    async with httpx.AsyncClient(timeout=30) as agent:
        return list(await asyncio.gather(*(agent.get(f"{sc.proxy}/crm/customers/{n}", headers=headers)
                                           for n in range(count))))


async def test_no_call_is_refused_once_a_restarted_redis_answers(make_sidecar: SidecarFactory, redis_server: Any) -> None:
    sc = await make_sidecar(store={"backend": "redis", "redis_url": redis_server.url})
    warm = await calls(sc, 8)  # several pooled connections, each to be broken by the restart
    assert [r.status_code for r in warm] == [200] * 8

    redis_server.stop()
    down = await eventually(lambda: readyz(sc, 503), what="readiness red while Redis is down")
    assert "approval_store" in down["failing"]
    refused = await calls(sc, 1)
    assert refused[0].status_code == 503 and refused[0].json()["code"] == "store_unavailable"

    redis_server.start()
    await eventually(lambda: readyz(sc, 200), deadline=5.0, what="readiness green once Redis answers")
    after = await calls(sc, 8)
    assert [r.status_code for r in after] == [200] * 8, [r.text for r in after if r.status_code != 200]
    async with httpx.AsyncClient() as client:
        opened = await client.post(f"{sc.admin}/v1/tasks", json={"intent": "after the restart"})
    assert opened.status_code == 201, opened.text
    with_task = await calls(sc, 4, opened.json()["id"])
    assert [r.status_code for r in with_task] == [200] * 4
