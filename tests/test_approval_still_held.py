"""A hold is enforced with an approval too.

An approval granted while a call was 'high' risk does not forward it once the task's history makes it 'critical'
(two approvers) and the policy, deciding again with input.approval, still says hold: a new approval is asked for,
with the policy's requirements now."""

from __future__ import annotations

import httpx

from approvals_support import (PUBLISH_BODY, ApproverIdP, audit_events, exfiltration_routes, open_task,
                               publish_approved_then_confidential_read)
from harness import SHIPPED_POLICY, EchoTool, SidecarFactory

ALICE = "alice@example.com"


async def test_policy_hold_after_approval_is_not_overridden(make_sidecar: SidecarFactory, echo_tool: EchoTool,
                                                           idp: ApproverIdP) -> None:
    sc = await make_sidecar(policy_dir=SHIPPED_POLICY, approvals=idp.config(), routes=exfiltration_routes(echo_tool.base))
    task = await open_task(sc.admin, "publish a post and look up customer 42")
    async with httpx.AsyncClient() as agent:
        # An external publish, held at 'high' risk (one approver), approved; then the agent reads confidential
        # customer data (allowed).
        approval_id, headers = await publish_approved_then_confidential_read(
            agent, sc.proxy, sc.admin, task, idp.token(ALICE, ["approvers"]))
        shown = (await agent.get(f"{sc.admin}/v1/approvals/{approval_id}")).json()
        assert shown["approvers_required"] == 1, shown
        # The retry: the policy sees an exfiltration chain, critical, two approvers; one was given.
        retried = await agent.post(f"{sc.proxy}/publish/posts", content=PUBLISH_BODY,
                                   headers={**headers, "X-Agent-Approval": approval_id})

    decisions = [e for e in audit_events(sc.audit_path) if e.get("type") == "decision" and e.get("approval_id") == approval_id
                 and e.get("outcome") == "allow"]
    results = [e["result"] for e in decisions]
    posted = [s for s in echo_tool.seen if s.method == "POST"]
    # The policy's own answer on the retry: hold (exfiltration_chain, critical, approvers short) ...
    assert not any(r and r.get("require_approval") for r in results), (
        f"the policy said hold on the retry ({[(r.get('risk'), r.get('approval'), r.get('reasons')) for r in results]}), yet the sidecar recorded "
        f"'allow' and forwarded {len(posted)} POST(s) upstream (status {retried.status_code})")
    # ... so nothing may reach the upstream.
    assert retried.status_code == 403 and posted == [], retried.text
