"""Every refusal is evidence: a refused approver action (bad token, the agent itself, the wrong group,
a decided approval) is audited with the approver's claimed identity and counted by code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric import ec

from approvals_support import AGENT, APPROVAL_POLICY, ApproverIdP, approve, audit_events, eventually, open_task
from harness import SidecarFactory
from harness import EchoTool
from sidecar.audit.show import render, task_timeline


def refusals_by_code(metrics: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith('agent_sidecar_refusals_total{code="'):
            code = line.split('"')[1]
            counts[code] = float(line.rsplit(" ", 1)[1])
    return counts


async def test_refused_approver_actions_are_audited_and_counted(make_sidecar: SidecarFactory, echo_tool: EchoTool,
                                                                tmp_path: Path) -> None:
    idp = ApproverIdP(tmp_path)
    sc = await make_sidecar(policy_dir=APPROVAL_POLICY, approvals=idp.config())
    task = await open_task(sc.admin)
    async with httpx.AsyncClient() as agent:
        held = (await agent.delete(f"{sc.proxy}/crm/customers/42", headers={"X-Agent-Task": task})).json()
        before = refusals_by_code((await agent.get(f"{sc.metrics}/metrics")).text)
    approval_id = held["approval_id"]
    forged = idp.token("mallory@example.com", ["approvers"], key=ec.generate_private_key(ec.SECP256R1()))

    attempts: list[tuple[str, str | None, int, str]] = [
        ("forged signature", forged, 401, "unauthorized"),
        ("no token", None, 401, "unauthorized"),
        ("the agent itself", idp.token(AGENT, ["approvers"]), 403, "approver_forbidden"),
        ("the wrong group", idp.token("bob@example.com", ["engineering"]), 403, "approver_forbidden"),
    ]
    for what, token, status, code in attempts:
        async with httpx.AsyncClient() as client:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            response = await client.post(f"{sc.admin}/v1/approvals/{approval_id}/approve", json={"comment": what},
                                         headers=headers)
        assert (response.status_code, response.json()["code"]) == (status, code), what
    granted = await approve(sc.admin, approval_id, idp.token("alice@example.com", ["approvers"]))
    assert granted.status_code == 200, granted.text
    late = await approve(sc.admin, approval_id, idp.token("carol@example.com", ["approvers"]), verdict="deny")
    assert (late.status_code, late.json()["code"]) == (409, "approval_conflict")

    async def refused() -> list[dict[str, Any]] | None:
        events = [e for e in audit_events(sc.audit_path) if e.get("type") == "approval.refused"]
        return events if len(events) == 5 else None

    events = await eventually(refused, what="five approval.refused events")
    seen = [(e["action"], e["code"], e["approver"], e["approver_verified"]) for e in events]
    assert seen == [
        ("approve", "unauthorized", "mallory@example.com", False),
        ("approve", "unauthorized", None, False),
        ("approve", "approver_forbidden", AGENT, True),
        ("approve", "approver_forbidden", "bob@example.com", True),
        ("deny", "approval_conflict", "carol@example.com", True),
    ]
    assert all(e["approval_id"] == approval_id for e in events)
    assert events[0]["token_error"] and "token_error" not in events[2]
    assert "group" in events[3]["detail"]
    log = sc.audit_path.read_text()
    assert forged not in log and forged.split(".")[2] not in log  # never the token, nor its signature

    async with httpx.AsyncClient() as client:
        after = refusals_by_code((await client.get(f"{sc.metrics}/metrics")).text)
    grew = {code: after[code] - before.get(code, 0) for code in after if after[code] != before.get(code, 0)}
    assert grew == {"unauthorized": 2, "approver_forbidden": 2, "approval_conflict": 1}

    story = render(task_timeline([sc.audit_path], task), [sc.audit_path])
    assert "approve by mallory@example.com (claimed, not verified) refused: unauthorized, token " in story
    assert f"approve by {AGENT} refused: approver_forbidden" in story
    assert "deny by carol@example.com refused: approval_conflict" in story
