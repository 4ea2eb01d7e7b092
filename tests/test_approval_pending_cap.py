"""Approval flooding. A held call files a pending approval; identical retries reuse it, but an agent that varies
the body (or the query) of a held call filed one new pending approval per variant, without bound: the approvers'
queue, the webhook and the approval store filled with look-alikes, the real malicious call hidden among them.

approvals.max_pending_per_task (and _per_agent, since an agent can open tasks at will) bound the approvals
waiting for a human at once: one more is refused 429 too_many_pending_approvals, never forwarded, nobody asked.
Real sidecars, sockets, the embedded engine, SQLite and a real redis-server shared by two sidecars."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from approvals_support import APPROVAL_POLICY, ApproverIdP, approve, audit_events, eventually, list_pending, open_task
from harness import EchoTool, RunningSidecar, SidecarFactory
from pending_cap_support import CAP, LookupsAtAGate, codes, post_note, replicas

ALICE = "alice@example.com"


async def capped_sidecar(make_sidecar: SidecarFactory, idp: ApproverIdP) -> RunningSidecar:
    return await make_sidecar(policy_dir=APPROVAL_POLICY,
                              approvals=idp.config(max_pending_per_task=CAP))


async def task_outcomes(admin: str, task: str) -> list[str]:
    async with httpx.AsyncClient() as client:
        history = (await client.get(f"{admin}/v1/tasks/{task}")).json()["history"]
    return [record["outcome"] for record in history["recent"]]


async def test_a_task_at_its_cap_is_refused_and_nothing_is_forwarded_or_asked(
        make_sidecar: SidecarFactory, echo_tool: EchoTool, idp: ApproverIdP) -> None:
    sc = await capped_sidecar(make_sidecar, idp)
    task = await open_task(sc.admin, "write notes on customer 42")
    async with httpx.AsyncClient(timeout=60) as agent:
        filed = [await post_note(agent, sc.proxy, task, f"note {n}") for n in range(CAP)]
        refused = await post_note(agent, sc.proxy, task, "note past the cap")
        # Waiting for the approval changes nothing: there is none to wait for.
        refused_waiting = await post_note(agent, sc.proxy, task, "another note past the cap", Prefer="wait=30")
    assert codes(filed) == ["approval_required"] * CAP
    for answer in (refused, refused_waiting):
        assert answer.status_code == 429, answer.text
        assert answer.headers["Content-Type"].startswith("application/problem+json")
        assert int(answer.headers["Retry-After"]) > 0
        problem = answer.json()
        assert problem["code"] == "too_many_pending_approvals"
        assert problem["pending_scope"] == "task" and problem["max_pending"] == CAP
        assert problem["decision_id"] and problem["reasons"] and "approval_id" not in problem
    assert echo_tool.seen == []
    pending = await list_pending(sc.admin, idp.token(ALICE, ["approvers"]))
    assert sorted(a["id"] for a in pending) == sorted(a.json()["approval_id"] for a in filed)
    # In the task's history as held calls, like any held call; in the audit as refused decisions.
    assert await task_outcomes(sc.admin, task) == ["hold"] * (CAP + 2)
    refused_ids = {refused.json()["decision_id"], refused_waiting.json()["decision_id"]}

    async def refusals_audited() -> list[dict[str, Any]] | None:
        found = [e for e in audit_events(sc.audit_path) if e.get("type") == "decision"
                 and e.get("decision_id") in refused_ids]
        return found if len(found) == 2 else None

    for event in await eventually(refusals_audited, what="both refusals in the audit log"):
        assert event["outcome"] == "refused" and event["code"] == "too_many_pending_approvals"
        assert event["task_id"] == task and event["approval_id"] is None
    requested = [e for e in audit_events(sc.audit_path) if e.get("type") == "approval.requested"]
    assert len(requested) == CAP


async def test_a_retry_of_a_call_whose_approval_is_pending_still_gets_it_at_the_cap(
        make_sidecar: SidecarFactory, idp: ApproverIdP) -> None:
    sc = await capped_sidecar(make_sidecar, idp)
    task = await open_task(sc.admin, "write notes on customer 42")
    async with httpx.AsyncClient(timeout=60) as agent:
        filed = [await post_note(agent, sc.proxy, task, f"note {n}") for n in range(CAP)]
        retries = [await post_note(agent, sc.proxy, task, f"note {n}") for n in range(CAP)]
    assert codes(retries) == ["approval_required"] * CAP
    assert [r.json()["approval_id"] for r in retries] == [f.json()["approval_id"] for f in filed]


async def test_a_decided_approval_makes_room_for_another(make_sidecar: SidecarFactory, echo_tool: EchoTool,
                                                         idp: ApproverIdP) -> None:
    sc = await capped_sidecar(make_sidecar, idp)
    task = await open_task(sc.admin, "write notes on customer 42")
    approver = idp.token(ALICE, ["approvers"])
    async with httpx.AsyncClient(timeout=60) as agent:
        filed = [await post_note(agent, sc.proxy, task, f"note {n}") for n in range(CAP)]
        assert (await post_note(agent, sc.proxy, task, "one more")).json()["code"] == "too_many_pending_approvals"
        denied = await approve(sc.admin, filed[0].json()["approval_id"], approver, verdict="deny")
        assert denied.status_code == 200, denied.text
        after_denial = await post_note(agent, sc.proxy, task, "one more")
        assert after_denial.json()["code"] == "approval_required", after_denial.text
        assert (await post_note(agent, sc.proxy, task, "and another")).json()["code"] == "too_many_pending_approvals"
        # Approved is decided too: the approval no longer waits for a human, whether or not it is used yet.
        approved = filed[1].json()["approval_id"]
        assert (await approve(sc.admin, approved, approver)).status_code == 200
        after_approval = await post_note(agent, sc.proxy, task, "and another")
        assert after_approval.json()["code"] == "approval_required", after_approval.text
        used = await post_note(agent, sc.proxy, task, "note 1", **{"X-Agent-Approval": approved})
    assert used.status_code == 200, used.text
    assert [s.path for s in echo_tool.seen] == ["/crm/notes"]


async def test_the_cap_counts_per_task_and_the_agent_over_all_its_tasks(make_sidecar: SidecarFactory,
                                                                         idp: ApproverIdP) -> None:
    sc = await make_sidecar(policy_dir=APPROVAL_POLICY,
                            approvals=idp.config(max_pending_per_task=2, max_pending_per_agent=5))
    first, second, third = [await open_task(sc.admin, f"write notes, part {n}") for n in range(3)]
    async with httpx.AsyncClient(timeout=60) as agent:
        in_first = [await post_note(agent, sc.proxy, first, f"first {n}") for n in range(3)]
        in_second = [await post_note(agent, sc.proxy, second, f"second {n}") for n in range(2)]
        # Calls outside any task count as one task of their agent.
        outside = [await post_note(agent, sc.proxy, None, f"outside {n}") for n in range(2)]
        in_third = await post_note(agent, sc.proxy, third, "third 0")
    assert codes(in_first) == ["approval_required", "approval_required", "too_many_pending_approvals"]
    assert in_first[2].json()["pending_scope"] == "task"
    assert codes(in_second) == ["approval_required"] * 2
    assert codes(outside) == ["approval_required", "too_many_pending_approvals"]
    assert outside[1].json()["pending_scope"] == "agent"  # 2 + 2 + 1 = 5 of this agent
    assert in_third.json()["code"] == "too_many_pending_approvals" and in_third.json()["pending_scope"] == "agent"


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_distinct_held_calls_sent_at_once_never_file_past_the_cap(
        backend: str, make_sidecar: SidecarFactory, tmp_path: Path, echo_tool: EchoTool, idp: ApproverIdP,
        request: pytest.FixtureRequest) -> None:
    sidecars = await replicas(backend, make_sidecar, tmp_path, idp, request)
    task = await open_task(sidecars[0].admin, "write notes on customer 42")
    calls = 16
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=calls)) as agent:
        answers = list(await asyncio.gather(*(
            post_note(agent, sidecars[n % len(sidecars)].proxy, task, f"note {n}") for n in range(calls))))
    assert sorted(codes(answers)) == ["approval_required"] * CAP + ["too_many_pending_approvals"] * (calls - CAP)
    for sc in sidecars:
        pending = await list_pending(sc.admin, idp.token(ALICE, ["approvers"]))
        assert len(pending) == CAP
    assert echo_tool.seen == []


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_identical_calls_racing_for_the_last_place_all_get_the_one_approval(
        backend: str, make_sidecar: SidecarFactory, tmp_path: Path, idp: ApproverIdP,
        request: pytest.FixtureRequest) -> None:
    """The store files one of them; the others, refused at the cap, find it: one call, one approval."""
    sidecars = await replicas(backend, make_sidecar, tmp_path, idp, request)
    task = await open_task(sidecars[0].admin, "write notes on customer 42")
    same = 6
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=same)) as agent:
        for n in range(CAP - 1):
            assert (await post_note(agent, sidecars[0].proxy, task, f"note {n}")).json()["code"] == "approval_required"
        arrived: list[int] = []
        everyone = asyncio.Event()
        for sc in sidecars:
            path = sc.sidecar.path
            path.approvals = LookupsAtAGate(path.approvals, arrived, everyone, same)
        answers = list(await asyncio.gather(*(
            post_note(agent, sidecars[n % len(sidecars)].proxy, task, "the last note") for n in range(same))))
    assert codes(answers) == ["approval_required"] * same, [a.text for a in answers]
    assert len({a.json()["approval_id"] for a in answers}) == 1
    assert len(await list_pending(sidecars[0].admin, idp.token(ALICE, ["approvers"]))) == CAP


async def test_a_held_mcp_tool_call_past_the_cap_is_answered_in_band(make_sidecar: SidecarFactory,
                                                                     echo_tool: EchoTool, idp: ApproverIdP) -> None:
    sc = await make_sidecar(policy_dir=APPROVAL_POLICY, approvals=idp.config(max_pending_per_task=1))
    task = await open_task(sc.admin, "delete records")

    def tools_call(record: int) -> dict[str, Any]:
        return {"jsonrpc": "2.0", "id": record, "method": "tools/call",
                "params": {"name": "delete_record", "arguments": {"record_id": record}}}

    async with httpx.AsyncClient(timeout=60) as agent:
        answers = [await agent.post(f"{sc.proxy}/tools/mcp", json=tools_call(n),
                                    headers={"X-Agent-Task": task, "Accept": "application/json, text/event-stream"})
                   for n in (7, 8)]
    held, refused = (a.json()["result"] for a in answers)
    assert held["_meta"]["dev.agent-sidecar/problem"]["code"] == "approval_required"
    assert answers[1].status_code == 200 and refused["isError"], answers[1].text
    problem = refused["_meta"]["dev.agent-sidecar/problem"]
    assert problem["code"] == "too_many_pending_approvals" and problem["status"] == 429
    assert refused["content"][0]["text"].startswith(
        "not sent: too many calls of this task are already waiting for human approval (at most 1)")
    assert answers[1].headers["Retry-After"]
    assert echo_tool.seen == []
