"""The shared approval queue in a real redis-server: two sidecars, and Redis taken away mid-test."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx

from approvals_support import APPROVAL_POLICY, ApproverIdP, approve, eventually, list_pending
from harness import SidecarFactory
from harness import EchoTool, RunningSidecar

ALICE = "alice@example.com"


async def redis_sidecar(make_sidecar: SidecarFactory, tmp_path: Path, idp: ApproverIdP, redis_url: str,
                        name: str) -> RunningSidecar:
    return await make_sidecar(policy_dir=APPROVAL_POLICY, approvals=idp.config(), state_dir=str(tmp_path / name),
                              store={"backend": "redis", "redis_url": redis_url})


async def pending(sc: RunningSidecar, idp: ApproverIdP) -> list[dict[str, Any]]:
    return await list_pending(sc.admin, idp.token(ALICE, ["approvers"]))


async def readiness(sc: RunningSidecar) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{sc.metrics}/readyz")
    return response.status_code, response.json()


async def test_approving_through_sidecar_a_releases_the_call_held_in_sidecar_b(
        make_sidecar: SidecarFactory, tmp_path: Path, echo_tool: EchoTool, redis_server: Any) -> None:
    idp = ApproverIdP(tmp_path)
    a = await redis_sidecar(make_sidecar, tmp_path, idp, redis_server.url, "a")
    b = await redis_sidecar(make_sidecar, tmp_path, idp, redis_server.url, "b")
    async with httpx.AsyncClient(timeout=60) as agent:
        held_in_b = asyncio.create_task(agent.delete(f"{b.proxy}/crm/customers/42", headers={"Prefer": "wait=30"}))
        [approval] = await eventually(lambda: pending(a, idp), what="B's held call in A's queue")
        assert approval["binding"]["method"] == "DELETE" and not held_in_b.done()
        assert (await approve(a.admin, approval["id"], idp.token(ALICE, ["approvers"]))).status_code == 200
        response = await held_in_b
    assert response.status_code == 200, response.text
    assert len(echo_tool.seen) == 1
    # Single use across the fleet: the same approval presented to A is spent.
    async with httpx.AsyncClient() as agent:
        again = await agent.delete(f"{a.proxy}/crm/customers/42", headers={"X-Agent-Approval": approval["id"]})
    assert again.json()["code"] == "approval_used"
    assert await pending(a, idp) == [] and await pending(b, idp) == []


async def test_redis_down_fails_closed_and_names_the_store_then_recovers(
        make_sidecar: SidecarFactory, tmp_path: Path, echo_tool: EchoTool, redis_server: Any) -> None:
    idp = ApproverIdP(tmp_path)
    sc = await redis_sidecar(make_sidecar, tmp_path, idp, redis_server.url, "only")
    assert (await readiness(sc))[0] == 200
    async with httpx.AsyncClient(timeout=60) as agent:
        before = (await agent.delete(f"{sc.proxy}/crm/customers/1")).json()
        assert before["code"] == "approval_required"
        waiting = asyncio.create_task(agent.delete(f"{sc.proxy}/crm/customers/2", headers={"Prefer": "wait=30"}))
        await eventually(lambda: pending(sc, idp), what="the waiting call's approval")

        redis_server.stop()
        held_while_down = await waiting
        assert held_while_down.status_code == 503 and held_while_down.json()["code"] == "store_unavailable"
        status, body = await readiness(sc)
        assert status == 503 and body["failing"] == ["approval_store"]
        assert "redis" in body["checks"]["approval_store"]["detail"]
        new_hold = await agent.delete(f"{sc.proxy}/crm/customers/3")
        assert new_hold.status_code == 503 and new_hold.json()["code"] == "store_unavailable"
        retried = await agent.delete(f"{sc.proxy}/crm/customers/1", headers={"X-Agent-Approval": before["approval_id"]})
        assert retried.status_code == 503 and retried.json()["code"] == "store_unavailable"
        refused_approval = await approve(sc.admin, before["approval_id"], idp.token(ALICE, ["approvers"]))
        assert refused_approval.status_code == 503
        assert echo_tool.seen == []

        redis_server.start()  # the same port, an empty Redis: no restart of the sidecar

        async def green() -> bool:
            return (await readiness(sc))[0] == 200
        await eventually(green, what="readiness to recover")
        after = (await agent.delete(f"{sc.proxy}/crm/customers/4")).json()
        assert after["code"] == "approval_required"
        assert (await approve(sc.admin, after["approval_id"], idp.token(ALICE, ["approvers"]))).status_code == 200
        response = await agent.delete(f"{sc.proxy}/crm/customers/4", headers={"X-Agent-Approval": after["approval_id"]})
    assert response.status_code == 200, response.text
    assert [s.path for s in echo_tool.seen] == ["/crm/customers/4"]
