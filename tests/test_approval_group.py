"""An approval binds its approver group.

An approval granted by one group does not cover the call once its risk rises to a level that needs another group
(approval.<risk>.group, a documented operator knob): the group of the approval is compared with the decision's
requirements (input.approval carries it), so one approver of the wrong group is not enough."""

from __future__ import annotations

from pathlib import Path

import httpx

from approvals_support import (PUBLISH_BODY, ApproverIdP, audit_events, exfiltration_routes, open_task,
                               publish_approved_then_confidential_read)
from harness import EchoTool, SidecarFactory
from task_concurrency_support import tuned_policy

ALICE = "alice@example.com"


def tiered_policy(tmp_path: Path) -> Path:
    """High risk: one member of 'approvers'. Critical: one member of 'security' (a stricter group)."""
    return tuned_policy(tmp_path, approval={
        "low": {"approvers": 1, "group": "approvers", "expires_in_seconds": 3600},
        "medium": {"approvers": 1, "group": "approvers", "expires_in_seconds": 3600},
        "high": {"approvers": 1, "group": "approvers", "expires_in_seconds": 1800},
        "critical": {"approvers": 1, "group": "security", "expires_in_seconds": 900},
    })


async def test_an_approval_from_the_high_risk_group_does_not_cover_a_call_now_critical(
        make_sidecar: SidecarFactory, echo_tool: EchoTool, idp: ApproverIdP, tmp_path: Path) -> None:
    sc = await make_sidecar(policy_dir=tiered_policy(tmp_path), approvals=idp.config(), routes=exfiltration_routes(echo_tool.base))
    task = await open_task(sc.admin, "publish a post and look up customer 42")
    async with httpx.AsyncClient() as agent:
        # A member of 'approvers' (not of 'security') approves the post while it is 'high' risk; the task then reads
        # confidential data: the post becomes an exfiltration chain, critical, which this deployment reserves to the
        # 'security' group.
        approval_id, headers = await publish_approved_then_confidential_read(
            agent, sc.proxy, sc.admin, task, idp.token(ALICE, ["approvers"]))
        shown = (await agent.get(f"{sc.admin}/v1/approvals/{approval_id}")).json()
        assert shown["group"] == "approvers", shown
        retried = await agent.post(f"{sc.proxy}/publish/posts", content=PUBLISH_BODY,
                                   headers={**headers, "X-Agent-Approval": approval_id})
    posted = [s for s in echo_tool.seen if s.method == "POST"]
    allowed = [e["result"] for e in audit_events(sc.audit_path)
               if e.get("type") == "decision" and e.get("approval_id") == approval_id and e.get("outcome") == "allow"]
    said = [(r.get("risk"), r.get("approval")) for r in allowed if r]
    assert retried.status_code == 403 and posted == [], (
        f"a critical call was forwarded ({retried.status_code}) on an approval given by group 'approvers' only, "
        f"the policy's own requirements for it being {said}")
    assert retried.json()["code"] == "approval_required", retried.text
