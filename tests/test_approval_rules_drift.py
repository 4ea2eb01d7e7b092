"""A retry of a held call got the pending approval of the same binding again whenever the policy asked
the same approvers of the same group (_hold), whatever the reasons and the risk were now. The approvers decide
on the reasons stored when the approval was made; the policy, deciding again with input.approval, saw only
id, status, approvals and group, so it could not tell that the approval was given for other reasons. Now an
approval is reused only when the rules and risk are the same, and input.approval carries its rules.

Here a critical payout to an external host (critical_amount: two approvers) is held; the agent then reads
confidential customer data, and the same payout now is also an exfiltration chain (critical: two approvers,
the same group). The retry is told to wait for the same approval, whose reasons, shown to every approver,
still say nothing about the confidential read. Two humans approve a payout; the sidecar forwards an
exfiltration the humans were never shown.

Real parts: httpx as the agent, the shipped rego/ library (embedded engine), the approvers' API with
ES256 ID tokens from a test IdP, the echo upstream.
"""

from __future__ import annotations


import httpx

from approvals_support import ApproverIdP, approve, exfiltration_routes, open_task
from harness import SHIPPED_POLICY, EchoTool, SidecarFactory




async def test_an_approval_shown_with_other_reasons_does_not_cover_the_call_now(
        make_sidecar: SidecarFactory, echo_tool: EchoTool, idp: ApproverIdP) -> None:
    sc = await make_sidecar(policy_dir=SHIPPED_POLICY, approvals=idp.config(), routes=exfiltration_routes(echo_tool.base, "payouts"))
    task = await open_task(sc.admin, "pay out supplier invoice 77 and look up customer 42")
    body = b'{"amount": 1500, "to": "supplier-77"}'
    headers = {"X-Agent-Task": task, "Content-Type": "application/json"}
    async with httpx.AsyncClient() as agent:
        held = await agent.post(f"{sc.proxy}/payouts/transfers", content=body, headers=headers)
        assert held.status_code == 403 and held.json()["code"] == "approval_required", held.text
        approval_id = held.json()["approval_id"]
        assert not any("exfiltration_chain" in r for r in held.json()["reasons"]), held.text

        read = await agent.get(f"{sc.proxy}/crm/customers/42", headers={"X-Agent-Task": task})
        assert read.status_code == 200, read.text

        retried = await agent.post(f"{sc.proxy}/payouts/transfers", content=body, headers=headers)
        assert retried.json()["code"] == "approval_required", retried.text
        assert any("exfiltration_chain" in r for r in retried.json()["reasons"]), retried.text

        # The approvers look at the approval the agent is waiting for, and approve what they are shown.
        shown = (await agent.get(f"{sc.admin}/v1/approvals/{retried.json()['approval_id']}")).json()
        for who in ("alice@example.com", "bob@example.com"):
            verdict = await approve(sc.admin, retried.json()["approval_id"], idp.token(who, ["approvers"]))
            assert verdict.status_code == 200, verdict.text

        final = await agent.post(f"{sc.proxy}/payouts/transfers", content=body,
                                 headers={**headers, "X-Agent-Approval": retried.json()["approval_id"]})

    forwarded = [s for s in echo_tool.seen if s.method == "POST" and s.path.startswith("/payouts")]
    shown_exfiltration = any("exfiltration_chain" in r for r in shown["reasons"])
    assert not forwarded or shown_exfiltration, (
        f"the payout was forwarded (HTTP {final.status_code}) as an exfiltration chain, on approval "
        f"{shown['id']} (the first hold's: {shown['id'] == approval_id}) whose approvers were shown only "
        f"{shown['reasons']}")
