"""Issue 15, items 4 and 5: can-decide is recorded before it counts; the audit writer under a failing disk.

A real sidecar whose audit log cannot be written: its file is swapped, under the running sidecar, for a
symlink to /dev/full, where every write fails with ENOSPC (root included), as on a full disk.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from approvals_support import APPROVAL_POLICY, ApproverIdP, approve, audit_events, eventually
from harness import SidecarFactory
from harness import EchoTool, RunningSidecar, open_task

ALICE = "alice@example.com"


@pytest.fixture
def idp(tmp_path: Path) -> ApproverIdP:
    return ApproverIdP(tmp_path)


def fill_the_disk(audit_path: Path) -> None:
    audit_path.unlink()
    audit_path.symlink_to("/dev/full")


def free_the_disk(audit_path: Path) -> None:
    audit_path.unlink()


async def hold_a_call(sc: RunningSidecar, task: str) -> str:
    async with httpx.AsyncClient() as agent:
        response = await agent.delete(f"{sc.proxy}/crm/customers/42", headers={"X-Agent-Task": task})
    assert response.json()["code"] == "approval_required", response.text
    approval_id: str = response.json()["approval_id"]
    return approval_id


async def approval_status(sc: RunningSidecar, approval_id: str) -> str:
    async with httpx.AsyncClient() as client:
        status: str = (await client.get(f"{sc.admin}/v1/approvals/{approval_id}")).json()["status"]
    return status


async def test_an_approval_is_refused_and_changes_nothing_while_the_audit_log_cannot_be_written(
        make_sidecar: SidecarFactory, idp: ApproverIdP, echo_tool: EchoTool) -> None:
    sc = await make_sidecar(policy_dir=APPROVAL_POLICY, approvals=idp.config())
    task = await open_task(sc.admin)
    approval_id = await hold_a_call(sc, task)
    fill_the_disk(sc.audit_path)

    refused = await approve(sc.admin, approval_id, idp.token(ALICE, ["approvers"]))
    assert refused.status_code == 503, refused.text
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert refused.json()["code"] == "audit_unavailable" and refused.json()["approval_id"] == approval_id
    assert await approval_status(sc, approval_id) == "pending"
    async with httpx.AsyncClient() as agent:
        retried = await agent.delete(f"{sc.proxy}/crm/customers/42",
                                     headers={"X-Agent-Task": task, "X-Agent-Approval": approval_id})
    assert retried.status_code >= 400 and echo_tool.seen == []

    free_the_disk(sc.audit_path)

    async def approved() -> httpx.Response | None:
        response = await approve(sc.admin, approval_id, idp.token(ALICE, ["approvers"]))
        return response if response.status_code == 200 else None

    await eventually(approved, what="the approval once the audit log can be written again")
    assert await approval_status(sc, approval_id) == "approved"
    granted = [e for e in audit_events(sc.audit_path) if e["type"] == "approval.approved"]
    assert [e["approval_id"] for e in granted] == [approval_id]


async def test_a_task_is_not_ended_while_its_end_cannot_be_audited(make_sidecar: SidecarFactory) -> None:
    sc = await make_sidecar()
    task = await open_task(sc.admin)
    fill_the_disk(sc.audit_path)
    async with httpx.AsyncClient() as client:
        refused = await client.post(f"{sc.admin}/v1/tasks/{task}/complete")
        still = await client.get(f"{sc.admin}/v1/tasks/{task}")
    assert refused.status_code == 503 and refused.json()["code"] == "audit_unavailable"
    assert still.json()["status"] == "open"

    free_the_disk(sc.audit_path)

    async def completed() -> dict[str, Any] | None:
        async with httpx.AsyncClient() as client:
            response = await client.post(f"{sc.admin}/v1/tasks/{task}/complete")
        return response.json() if response.status_code == 200 else None

    assert (await eventually(completed, what="the completion once the audit log can be written"))["status"] == "completed"
    ended = [e for e in audit_events(sc.audit_path) if e["type"] == "task.completed"]
    assert [e["task_id"] for e in ended] == [task]
    assert os.path.isfile(sc.audit_path)


# ------------------------------------------------------------------ item 5: the audit file under the running sidecar


async def ready(sc: RunningSidecar) -> dict[str, Any] | None:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{sc.metrics}/readyz")
    return response.json() if response.status_code == 200 else None


async def not_ready(sc: RunningSidecar) -> dict[str, Any] | None:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{sc.metrics}/readyz")
    return response.json() if response.status_code == 503 else None


async def displaced_count(sc: RunningSidecar, what: str) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{sc.metrics}/metrics")).text
    prefix = f'agent_sidecar_audit_file_displaced_total{{kind="{what}"}} '
    return next(float(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix))


def verify_whole_chain(directory: Path) -> subprocess.CompletedProcess[str]:
    """The real command, on the directory: every file of the chain, oldest first, from its genesis."""
    return subprocess.run([sys.executable, "-m", "sidecar", "audit", "verify", str(directory)],
                          capture_output=True, text=True, timeout=60)


async def allowed_call(sc: RunningSidecar, path: str) -> None:
    async with httpx.AsyncClient() as agent:
        response = await agent.get(f"{sc.proxy}{path}")
    assert response.status_code == 200, response.text


async def test_a_removed_audit_file_is_noticed_and_the_chain_continues_whole(
        make_sidecar: SidecarFactory, caplog: pytest.LogCaptureFixture) -> None:
    sc = await make_sidecar()
    await allowed_call(sc, "/crm/customers/1")
    before = audit_events(sc.audit_path)
    sc.audit_path.unlink()

    async def noticed() -> float:
        return await displaced_count(sc, "removed")

    await eventually(noticed, what="the writer noticing its file was removed (no call made)")
    await eventually(lambda: ready(sc), what="readiness once the chain continues in a new segment")
    await allowed_call(sc, "/crm/customers/2")

    recovered = sc.audit_path.with_name("audit.000001.jsonl")
    assert audit_events(recovered) == before  # the deleted file's events, kept from the open descriptor
    segment, *after = audit_events(sc.audit_path)
    assert segment["type"] == "audit.segment_started" and segment["recovered_into"] == recovered.name
    assert segment["prev_hash"] == before[-1]["hash"]
    assert any(e.get("type") == "decision" for e in after)
    result = verify_whole_chain(sc.audit_path.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert any("audit file removed" in record.getMessage() for record in caplog.records)


async def test_a_replaced_audit_file_is_moved_aside_and_the_chain_continues_whole(make_sidecar: SidecarFactory) -> None:
    sc = await make_sidecar()
    await allowed_call(sc, "/crm/customers/1")
    forged = sc.audit_path.with_name("forged.jsonl")
    forged.write_text('{"seq": 0, "type": "forged"}\n')
    os.replace(forged, sc.audit_path)

    async def noticed() -> float:
        return await displaced_count(sc, "replaced")

    await eventually(noticed, what="the writer noticing its file was replaced")
    await eventually(lambda: ready(sc), what="readiness once the chain continues in a new segment")
    await allowed_call(sc, "/crm/customers/2")
    [aside] = sc.audit_path.parent.glob("audit.jsonl.foreign-*")
    assert aside.read_text() == '{"seq": 0, "type": "forged"}\n'
    result = verify_whole_chain(sc.audit_path.parent)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_readiness_is_red_while_the_disk_is_full_and_green_within_seconds_of_it_recovering(
        make_sidecar: SidecarFactory) -> None:
    sc = await make_sidecar()
    await allowed_call(sc, "/crm/customers/1")
    fill_the_disk(sc.audit_path)
    async with httpx.AsyncClient() as agent:
        refused = await agent.get(f"{sc.proxy}/crm/customers/2")
    assert refused.status_code == 503 and refused.json()["code"] == "audit_unavailable"
    report = await eventually(lambda: not_ready(sc), what="readiness turning red")
    assert report["failing"] == ["audit"] and "No space left" in report["checks"]["audit"]["detail"]

    free_the_disk(sc.audit_path)
    await eventually(lambda: ready(sc), deadline=5.0, what="readiness green without any call being made")
    resumed = [e for e in audit_events(sc.audit_path) if e["type"] == "audit.resumed"]
    assert len(resumed) == 1 and resumed[0]["events_not_written"] >= 1
    await allowed_call(sc, "/crm/customers/3")
    result = verify_whole_chain(sc.audit_path.parent)
    assert result.returncode == 0, result.stdout + result.stderr


OBLIGING_POLICY = '''package sidecar.authz

decision := {"allow": false, "reasons": ["anomaly: revoke"], "risk": "critical", "obligations": ["revoke_task"]}
'''


async def test_a_policy_obligation_revokes_a_task_only_once_the_revocation_is_audited(
        make_sidecar: SidecarFactory, tmp_path: Path) -> None:
    policy = tmp_path / "obliging" / "sidecar" / "authz"
    policy.mkdir(parents=True)
    (policy / "decision.rego").write_text(OBLIGING_POLICY)
    sc = await make_sidecar(policy={"engine": "embedded", "rego_dir": str(tmp_path / "obliging"), "timeout_ms": 2000})
    task = await open_task(sc.admin)
    fill_the_disk(sc.audit_path)
    async with httpx.AsyncClient() as client:
        refused = await client.get(f"{sc.proxy}/crm/customers/1", headers={"X-Agent-Task": task})
        still = await client.get(f"{sc.admin}/v1/tasks/{task}")
    assert refused.status_code == 503 and refused.json()["code"] == "audit_unavailable"
    assert still.json()["status"] == "open"

    free_the_disk(sc.audit_path)

    async def revoked() -> dict[str, Any] | None:
        async with httpx.AsyncClient() as client:
            response = await client.get(f"{sc.proxy}/crm/customers/1", headers={"X-Agent-Task": task})
        return response.json() if response.status_code == 403 else None

    denied = await eventually(revoked, what="the revocation once the audit log can be written")
    assert denied["code"] == "denied" and "revoked by a policy obligation" in denied["detail"]
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{sc.admin}/v1/tasks/{task}")).json()["status"] == "revoked"
    assert [e["task_id"] for e in audit_events(sc.audit_path) if e["type"] == "task.revoked"] == [task]
