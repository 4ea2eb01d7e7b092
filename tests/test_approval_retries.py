"""One held call, one approval, however often it is retried.

Retrying an identical held REST call, or re-presenting a granted approval the policy still holds (the agent told
"retry_with_header"), gets the one pending approval filed for that call: no new approval, approval.requested event
or webhook per retry. Identical approvals piling up in the approvers' queue would let the one call run once per
approval, and a flood would fill the webhook queue (1000) and the pending list (500 shown)."""

from __future__ import annotations

import httpx

from approvals_support import (PUBLISH_BODY, ApproverIdP, exfiltration_routes, list_pending, open_task,
                               publish_approved_then_confidential_read)
from harness import SHIPPED_POLICY, EchoTool, SidecarFactory

ALICE = "alice@example.com"
RETRIES = 10


async def test_retrying_one_held_call_does_not_file_an_approval_per_retry(make_sidecar: SidecarFactory,
                                                                          idp: ApproverIdP) -> None:
    sc = await make_sidecar(approvals=idp.config())
    task = await open_task(sc.admin, "clean up duplicate customer records")
    async with httpx.AsyncClient() as agent:
        answers = [await agent.delete(f"{sc.proxy}/crm/customers/42", headers={"X-Agent-Task": task})
                   for _ in range(RETRIES)]
    assert {a.json()["code"] for a in answers} == {"approval_required"}
    ids = {a.json()["approval_id"] for a in answers}
    pending = await list_pending(sc.admin, idp.token(ALICE, ["approvers"]))
    assert len(ids) == 1 and len(pending) == 1, (
        f"{RETRIES} retries of one identical held DELETE filed {len(ids)} approvals "
        f"({len(pending)} pending in the approvers' queue)")


async def test_re_presenting_an_approval_the_policy_still_holds_does_not_file_one_per_retry(
        make_sidecar: SidecarFactory, echo_tool: EchoTool, idp: ApproverIdP) -> None:
    sc = await make_sidecar(policy_dir=SHIPPED_POLICY, approvals=idp.config(), routes=exfiltration_routes(echo_tool.base))
    task = await open_task(sc.admin, "publish a post and look up customer 42")
    async with httpx.AsyncClient() as agent:
        approval_id, headers = await publish_approved_then_confidential_read(
            agent, sc.proxy, sc.admin, task, idp.token(ALICE, ["approvers"]))
        retries = [await agent.post(f"{sc.proxy}/publish/posts", content=PUBLISH_BODY,
                                    headers={**headers, "X-Agent-Approval": approval_id}) for _ in range(RETRIES)]
    assert {r.json()["code"] for r in retries} == {"approval_required"}, [r.text for r in retries]
    new_ids = {r.json()["approval_id"] for r in retries}
    pending = await list_pending(sc.admin, idp.token("bob@example.com", ["approvers"]))
    assert len(new_ids) == 1 and len(pending) == 1, (
        f"{RETRIES} retries carrying approval {approval_id} (the policy still holds: critical, 2 approvers) "
        f"filed {len(new_ids)} new approvals ({len(pending)} pending for the same call)")
