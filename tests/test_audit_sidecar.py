"""The audit chain written by a running sidecar: fail closed when the sink fails, and `audit show`."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import httpx
import jwt
import pytest

from approvals_support import APPROVAL_POLICY, ApproverIdP, approve, audit_event, audit_events, eventually, open_task
from harness import SidecarFactory
from harness import EchoTool, RunningSidecar, sidecar_config, start_sidecar
from sidecar.audit import chain_files, verify_files
from sidecar.cli import main


async def scrape(sc: RunningSidecar) -> str:
    async with httpx.AsyncClient() as client:
        return (await client.get(f"{sc.metrics}/metrics")).text


def sample(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exposed")


def break_the_sink(path: Path) -> None:
    """Replace the audit file by a directory: the writer cannot reopen it, as root too.

    (Making the directory read-only, the obvious way, does not stop root, and these tests run as root.)
    """
    path.unlink()
    path.mkdir()


async def test_a_failing_sink_fails_closed_counts_and_turns_readyz_red(make_sidecar: SidecarFactory,
                                                                      echo_tool: EchoTool) -> None:
    sc = await make_sidecar()
    async with httpx.AsyncClient() as agent:
        assert (await agent.get(f"{sc.proxy}/crm/customers/1")).status_code == 200
        await eventually(lambda: _async(len(audit_events(sc.audit_path)) >= 2), what="the first call's events")
        break_the_sink(sc.audit_path)

        refused = await agent.get(f"{sc.proxy}/crm/customers/2")
        assert refused.status_code == 503, refused.text
        assert refused.json()["code"] == "audit_unavailable"
        assert [seen.path for seen in echo_tool.seen] == ["/crm/customers/1"]  # nothing forwarded on doubt

        ready = await agent.get(f"{sc.metrics}/readyz")
        assert ready.status_code == 503 and "audit" in ready.json()["failing"]
        assert sample(await scrape(sc), "agent_sidecar_audit_write_errors_total") >= 1
        assert sample(await scrape(sc), 'agent_sidecar_requests_total{outcome="error",route="crm"}') == 1

        sc.audit_path.rmdir()  # the sink comes back: so do the calls, on the same chain
        assert (await agent.get(f"{sc.proxy}/crm/customers/3")).status_code == 200
        assert (await agent.get(f"{sc.metrics}/readyz")).status_code == 200
    first = json.loads(sc.audit_path.read_text().splitlines()[0])
    assert first["seq"] > 0 and first["prev_hash"] != "0" * 64  # linked to the events of the vanished file


async def test_with_fail_closed_off_calls_go_through_and_failures_are_counted(make_sidecar: SidecarFactory,
                                                                             echo_tool: EchoTool) -> None:
    sc = await make_sidecar(audit={"fail_closed": False})
    async with httpx.AsyncClient() as agent:
        assert (await agent.get(f"{sc.proxy}/crm/customers/1")).status_code == 200
        break_the_sink(sc.audit_path)
        response = await agent.get(f"{sc.proxy}/crm/customers/2")
        assert response.status_code == 200
        assert len(echo_tool.seen) == 2
        assert sample(await scrape(sc), "agent_sidecar_audit_write_errors_total") >= 1


async def test_rotation_while_serving_keeps_one_verifiable_chain(make_sidecar: SidecarFactory) -> None:
    sc = await make_sidecar(audit={"rotate_bytes": 4096})
    async with httpx.AsyncClient() as agent:
        for n in range(12):
            assert (await agent.get(f"{sc.proxy}/crm/customers/{n}")).status_code == 200

    async def settled() -> bool:
        result = verify_files(chain_files(sc.audit_path))
        return result.ok and result.events >= 24  # a decision and an upstream event per call

    await eventually(lambda: settled(), what="24 verified events")
    assert len(chain_files(sc.audit_path)) > 2


async def test_audit_show_tells_a_tasks_story(make_sidecar: SidecarFactory, echo_tool: EchoTool, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    idp = ApproverIdP(tmp_path)
    sc = await make_sidecar(policy_dir=APPROVAL_POLICY, approvals=idp.config())
    task = await open_task(sc.admin, intent="remove the duplicate customer 42")
    other = await open_task(sc.admin, intent="someone else's task")
    async with httpx.AsyncClient() as agent:
        read = await agent.get(f"{sc.proxy}/crm/customers/42", headers={"X-Agent-Task": task})
        assert read.status_code == 200
        await agent.get(f"{sc.proxy}/crm/customers/7", headers={"X-Agent-Task": other})
        held = (await agent.delete(f"{sc.proxy}/crm/customers/42", headers={"X-Agent-Task": task})).json()
        approval_id = held["approval_id"]
        granted = await approve(sc.admin, approval_id, idp.token("alice@example.com", ["approvers"]),
                                comment="it is a duplicate")
        assert granted.status_code == 200, granted.text
        done = await agent.delete(f"{sc.proxy}/crm/customers/42",
                                  headers={"X-Agent-Task": task, "X-Agent-Approval": approval_id})
        assert done.status_code == 200, done.text
    jtis = [jwt.decode(s.headers["authorization"][0][7:], options={"verify_signature": False})["jti"]
            for s in echo_tool.seen if s.path == "/crm/customers/42"]
    await audit_event(sc.audit_path, "approval.used", approval_id)
    await eventually(lambda: _async(sum(e["type"] == "upstream" for e in audit_events(sc.audit_path)) >= 3),
                     what="three upstream events")

    assert main(["audit", "show", "--task", task, str(sc.audit_path.parent)]) == 0
    out = capsys.readouterr().out
    assert f"Task {task}" in out
    assert 'intent    "remove the duplicate customer 42"' in out
    assert "agent     spiffe://test/ns/agents/sa/agent-under-test" in out
    assert "chain     verified" in out
    assert "DECISION  ALLOW" in out and "DECISION  HOLD" in out
    assert "reason: approvals fixture: DELETE on crm needs a human" in out
    assert "APPROVAL  REQUESTED" in out and "needs 1 approver(s) from group approvers" in out
    assert 'by alice@example.com (1/1): "it is a duplicate"' in out
    assert "APPROVAL  USED" in out
    assert "UPSTREAM  200" in out
    for jti in jtis:
        assert f"credential jti {jti}" in out
    assert other not in out and "customers/7" not in out
    lines = out.splitlines()
    order = [next(i for i, line in enumerate(lines) if marker in line)
             for marker in ("DECISION  ALLOW", "APPROVAL  REQUESTED", "APPROVAL  APPROVED", "APPROVAL  USED")]
    assert order == sorted(order)

    assert main(["audit", "show", "--task", "t-unknown", str(sc.audit_path)]) == 1
    assert "no events for task t-unknown" in capsys.readouterr().out


async def test_audit_show_warns_when_the_chain_is_broken(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sidecar.audit import HashChainLog

    log = HashChainLog(tmp_path / "audit.jsonl")
    for n in range(3):
        log.append({"type": "decision", "task_id": "t-1", "decision_id": f"d-{n}", "outcome": "allow", "reasons": []})
    log.close()
    copy = tmp_path / "copy.jsonl"
    shutil.copy(tmp_path / "audit.jsonl", copy)
    lines = copy.read_text().splitlines()
    copy.write_text("\n".join([lines[0], lines[2]]) + "\n")
    assert main(["audit", "show", "--task", "t-1", str(copy)]) == 0
    assert "chain     BROKEN after 1 events" in capsys.readouterr().out


async def _async(value: bool) -> bool:
    return value


async def test_the_chain_and_the_task_store_are_written_by_one_thread_that_stops_with_the_sidecar(
        tmp_path: Path, echo_tool: EchoTool) -> None:
    """One disk thread, not one per store (docs/performance.md: fewer wake-ups and GIL hand-offs per call)."""
    before = set(threading.enumerate())
    sc = await start_sidecar(tmp_path, sidecar_config(tmp_path, echo_tool.base))
    started = [thread for thread in threading.enumerate() if thread not in before]
    try:
        async with httpx.AsyncClient() as agent:
            assert (await agent.get(f"{sc.proxy}/crm/customers/1")).status_code == 200
        assert [thread.name for thread in started if thread.name in ("disk-writer", "audit-writer", "task-store")] \
            == ["disk-writer"]
    finally:
        await sc.sidecar.stop()
    disk = next(thread for thread in started if thread.name == "disk-writer")
    disk.join(5)
    assert not disk.is_alive()
    assert [event["type"] for event in audit_events(sc.audit_path)][-2:] == ["decision", "upstream"]
