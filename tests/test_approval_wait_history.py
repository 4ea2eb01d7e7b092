"""A held call that waited for its approval (Prefer: wait) and was denied by a human never joined
its task's history, while the same held call without Prefer: wait does (outcome "hold"). The task's history
(the policy's view of what the task did, calls, recent outcomes, the hard call cap) loses every held call an
agent makes with Prefer: wait and that a human refuses."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from approvals_support import ApproverIdP, approve, audit_events, eventually, open_task
from harness import SidecarFactory

ALICE = "alice@example.com"



async def history(admin: str, task: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        found: dict[str, Any] = (await client.get(f"{admin}/v1/tasks/{task}")).json()["history"]
    return found


async def test_a_held_call_that_waited_and_was_denied_is_in_its_task_history(make_sidecar: SidecarFactory,
                                                                             idp: ApproverIdP) -> None:
    sc = await make_sidecar(approvals=idp.config())
    task = await open_task(sc.admin, "clean up duplicate customer records")
    async with httpx.AsyncClient(timeout=60) as agent:
        # Baseline: a held call that does not wait is counted at once, as "hold".
        plain = await agent.delete(f"{sc.proxy}/crm/customers/41", headers={"X-Agent-Task": task})
        assert plain.json()["code"] == "approval_required", plain.text
        assert [r["outcome"] for r in (await history(sc.admin, task))["recent"]] == ["hold"]

        waiting = asyncio.ensure_future(agent.delete(f"{sc.proxy}/crm/customers/42",
                                                     headers={"X-Agent-Task": task, "Prefer": "wait=30"}))

        async def requested() -> str | None:
            for event in audit_events(sc.audit_path):
                if event.get("type") == "approval.requested" and event.get("approval_id") != plain.json()["approval_id"]:
                    return str(event["approval_id"])
            return None

        approval_id = await eventually(requested, what="the waiting DELETE's approval")
        denied = await approve(sc.admin, approval_id, idp.token(ALICE, ["approvers"]), verdict="deny")
        assert denied.status_code == 200, denied.text
        answer = await waiting
    assert answer.json()["code"] == "approval_denied", answer.text
    found = await history(sc.admin, task)
    outcomes = [r["outcome"] for r in found["recent"]]
    assert found["calls"] == 2 and len(outcomes) == 2, (
        f"the DELETE held while it waited (then denied by a human) is missing from the task's history: "
        f"calls={found['calls']}, recent outcomes={outcomes}")
