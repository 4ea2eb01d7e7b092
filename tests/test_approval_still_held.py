"""An approval granted while a call was 'high' risk forwarded the call even after the task's history
made it 'critical' (two approvers) and the policy, deciding again with input.approval, still said hold.
A hold is enforced with an approval too: a new approval is asked for, with the policy's requirements now."""

from __future__ import annotations


import httpx

from approvals_support import ApproverIdP, approve, audit_events, exfiltration_routes, open_task
from harness import SHIPPED_POLICY, EchoTool, SidecarFactory

ALICE = "alice@example.com"




async def test_policy_hold_after_approval_is_not_overridden(make_sidecar: SidecarFactory, echo_tool: EchoTool,
                                                           idp: ApproverIdP) -> None:
    sc = await make_sidecar(policy_dir=SHIPPED_POLICY, approvals=idp.config(), routes=exfiltration_routes(echo_tool.base))
    task = await open_task(sc.admin, "publish a post and look up customer 42")
    body = b'{"text": "hello"}'
    headers = {"X-Agent-Task": task, "Content-Type": "application/json"}
    async with httpx.AsyncClient() as agent:
        # 1. An external publish: held at 'high' risk, one approver.
        held = await agent.post(f"{sc.proxy}/publish/posts", content=body, headers=headers)
        assert held.status_code == 403, held.text
        problem = held.json()
        assert problem["code"] == "approval_required", problem
        approval_id = problem["approval_id"]
        shown = (await agent.get(f"{sc.admin}/v1/approvals/{approval_id}")).json()
        assert shown["approvers_required"] == 1, shown

        # 2. A human approves that post (nothing confidential read in the task yet).
        granted = await approve(sc.admin, approval_id, idp.token(ALICE, ["approvers"]))
        assert granted.status_code == 200, granted.text

        # 3. The agent now reads confidential customer data (allowed).
        read = await agent.get(f"{sc.proxy}/crm/customers/42", headers={"X-Agent-Task": task})
        assert read.status_code == 200, read.text

        # 4. The retry: the policy sees an exfiltration chain, critical, two approvers; one was given.
        retried = await agent.post(f"{sc.proxy}/publish/posts", content=body,
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
