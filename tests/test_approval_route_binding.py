"""An approval was not bound to its route (it is now: approval_wrong_route). Two routes that reach the same upstream target (a common
set-up: one upstream, two route names with their own labels and credentials) share approvals: a human approves
the call on route "crm", and the agent spends that approval on route "billing", whose credential is minted."""

from __future__ import annotations

from pathlib import Path

import httpx
import jwt
import pytest

from approvals_support import APPROVAL_POLICY, ApproverIdP, approve, open_task
from harness import EchoTool, SidecarFactory

ALICE = "alice@example.com"



async def test_approval_for_one_route_is_refused_on_another(make_sidecar: SidecarFactory, echo_tool: EchoTool,
                                                           idp: ApproverIdP) -> None:
    routes = [
        {"name": "crm", "match": {"path_prefix": "/crm"}, "upstream": f"{echo_tool.base}/crm",
         "labels": {"environment": "dev"}},
        # Same upstream, reached under another name: /billing/crm/... is the same target as /crm/...
        {"name": "billing", "match": {"path_prefix": "/billing"}, "upstream": echo_tool.base,
         "labels": {"environment": "prod"}},
    ]
    sc = await make_sidecar(policy_dir=APPROVAL_POLICY, approvals=idp.config(), routes=routes)
    task = await open_task(sc.admin)
    async with httpx.AsyncClient() as agent:
        held = await agent.delete(f"{sc.proxy}/crm/customers/42", headers={"X-Agent-Task": task})
        assert held.status_code == 403 and held.json()["code"] == "approval_required", held.text
        approval_id = held.json()["approval_id"]
        shown = (await agent.get(f"{sc.admin}/v1/approvals/{approval_id}")).json()
        assert shown["route"] == "crm"  # what the approver is shown and approves

        granted = await approve(sc.admin, approval_id, idp.token(ALICE, ["approvers"]))
        assert granted.status_code == 200, granted.text

        swapped = await agent.delete(f"{sc.proxy}/billing/crm/customers/42",
                                     headers={"X-Agent-Task": task, "X-Agent-Approval": approval_id})
    forwarded = [s for s in echo_tool.seen if s.method == "DELETE"]
    audiences = [jwt.decode(s.headers["authorization"][0][7:], options={"verify_signature": False})["aud"]
                 for s in forwarded]
    assert swapped.status_code == 403 and forwarded == [], (
        f"approval {approval_id}, granted for route crm, was spent on route billing: status {swapped.status_code}, "
        f"credential audiences upstream {audiences}")
