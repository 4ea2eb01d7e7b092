"""Issue 19, replay before rollout: recorded decisions re-evaluated against a candidate policy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from approvals_support import audit_events, eventually
from harness import ROOT, EchoTool, open_task, sidecar_config, start_sidecar
from sidecar.cli import main
from sidecar.policy.bundle import build_bundle


@pytest.fixture
async def recorded(tmp_path: Path, echo_tool: EchoTool) -> Path:
    """An audit chain of real calls decided by the shipped library: four reads allowed, a delete and a bulk read held."""
    config = sidecar_config(tmp_path, echo_tool.base, policy_dir=ROOT / "rego")
    sc = await start_sidecar(tmp_path, config)
    try:
        task = await open_task(sc.admin, "look up customers")
        async with httpx.AsyncClient() as agent:
            headers = {"X-Agent-Task": task}
            for n in range(4):
                assert (await agent.get(f"{sc.proxy}/crm/customers/{n}", headers=headers)).status_code == 200
            assert (await agent.delete(f"{sc.proxy}/crm/customers/9", headers=headers)).status_code == 403
            assert (await agent.get(f"{sc.proxy}/crm/customers?limit=5000", headers=headers)).status_code == 403

        async def all_decided() -> bool:
            return bool(sum(e.get("type") == "decision" for e in audit_events(sc.audit_path)) >= 6)

        await eventually(all_decided, what="six decision events")
    finally:
        await sc.sidecar.stop()
    return sc.audit_path.parent


def test_replay_of_the_policy_that_decided_finds_no_change(recorded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "replay", "--audit", str(recorded), "--policy", str(ROOT / "rego")]) == 0
    out = capsys.readouterr().out
    assert "replayed 6 recorded decisions" in out and "no decision would change" in out
    assert "recorded by: authz sha256:" in out


def test_replay_finds_a_planted_difference_grouped_by_rule(recorded: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    candidate = tmp_path / "candidate"
    shutil.copytree(ROOT / "rego", candidate)
    data = json.loads((candidate / "data.json").read_text())
    data["sidecar"]["config"]["agent_routes"] = {"*": ["payments"]}  # the planted change: no more crm for agents
    (candidate / "data.json").write_text(json.dumps(data))

    assert main(["policy", "replay", "--audit", str(recorded), "--policy", str(candidate)]) == 1
    out = capsys.readouterr().out
    assert "6 decision(s) would change:" in out
    assert "  allow -> deny: 4\n    +agent_route_not_allowed -allowed: 4  e.g. " in out  # the rule that explains it
    assert "  hold -> deny: 2\n    +agent_route_not_allowed: 2  e.g. " in out  # the held delete and bulk read

    # The same candidate as a signed bundle, the JSON report, example decision ids from the chain.
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    public = tmp_path / "public.pem"
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    bundle = tmp_path / "candidate.tar.gz"
    bundle.write_bytes(build_bundle(candidate, revision="pr-118", signing_key=key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())))
    assert main(["policy", "replay", "--audit", str(recorded), "--policy", str(bundle), "--public-key", str(public),
                 "--json", "--examples", "2"]) == 1
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert report["revision"] == "pr-118" and report["replayed"] == 6 and report["changed"] == 6
    [group] = [g for g in report["groups"] if (g["from"], g["to"]) == ("allow", "deny")]
    assert group["count"] == 4 and len(group["examples"]) == 2 and "+agent_route_not_allowed" in group["rules"]
    decision_ids = {e["decision_id"] for e in audit_events(recorded / "audit.jsonl") if e.get("type") == "decision"}
    assert set(group["examples"]) <= decision_ids


def test_replay_without_decisions_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "audit.jsonl"
    empty.write_text("")
    assert main(["policy", "replay", "--audit", str(empty), "--policy", str(ROOT / "rego")]) == 2
    assert "no recorded decision" in capsys.readouterr().err


def test_replay_counts_inputs_of_another_contract_version_apart(recorded: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A decision recorded with an input v1 document (before input v2) is not judged by a v2 policy: it is named."""
    events = [e for e in audit_events(recorded / "audit.jsonl") if e.get("type") == "decision"]
    old: dict[str, Any] = json.loads(json.dumps(events[0]))
    old["decision_id"], old["input"]["version"] = "d-recorded-as-v1", "v1"
    old["input"]["task"]["history"]["recent"] = [{"route": "crm", "method": "GET", "path": "/customers/1", "host": "x",
                                                  "outcome": "allow", "at": "2025-06-01T11:59:59.000Z", "state": "completed"}]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(e) + "\n" for e in [old, *events]))
    assert main(["policy", "replay", "--audit", str(mixed), "--policy", str(ROOT / "rego")]) == 0
    out = capsys.readouterr().out
    assert "replayed 6 recorded decisions" in out and "no decision would change" in out
    assert "not replayed: 1 recorded decision(s) with an input v1 document (this sidecar sends v2" in out

    only_old = tmp_path / "old.jsonl"
    only_old.write_text(json.dumps(old) + "\n")
    assert main(["policy", "replay", "--audit", str(only_old), "--policy", str(ROOT / "rego"), "--json"]) == 2
    assert "1 with input v1" in capsys.readouterr().err
