"""`make run`'s demo, played once against the shipped rego/ library and examples/demo.yaml: the whole
story, from an allowed call to a human approval, the retry going through once, the task's completion
revoking its credentials, and the task's audit story."""

from __future__ import annotations

import re
import stat
import subprocess
import sys
from pathlib import Path

import yaml

from harness import ROOT, free_port
from sidecar.config import load_config


def test_the_demo_config_loads_once_the_demo_made_its_development_files(tmp_path: Path) -> None:
    from sidecar.demo import prepare_dev_files

    config = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    config["approvals"]["approvers"]["jwks"] = str(tmp_path / "dev-approver" / "jwks.json")
    config["introspection"]["tokens_file"] = str(tmp_path / "dev-introspection.token")
    config["policy"]["rego_dir"] = str(ROOT / "rego")
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    approver = prepare_dev_files(path)
    assert approver is not None
    loaded = load_config(path)
    assert loaded.approvals.approvers is not None and loaded.introspection.tokens_file is not None
    for secret in (approver.key_path, approver.token_path, loaded.introspection.tokens_file):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    key_before = approver.key_path.read_bytes()
    assert prepare_dev_files(path) is not None and approver.key_path.read_bytes() == key_before  # kept, not remade


def test_demo_plays_the_whole_story(tmp_path: Path) -> None:
    config = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    tool_port = free_port()
    state = tmp_path / "state"
    config["listeners"] = {name: f"127.0.0.1:{free_port()}" for name in ("proxy", "admin", "metrics")}
    config["state_dir"] = str(state)
    config["policy"]["rego_dir"] = str(ROOT / "rego")
    config["approvals"]["approvers"]["jwks"] = str(state / "dev-approver" / "jwks.json")
    config["introspection"]["tokens_file"] = str(state / "dev-introspection.token")
    for route in config["routes"]:
        route["upstream"] = route["upstream"].replace(":18080", f":{tool_port}")
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "sidecar.demo", "--once", "--config", str(path),
                             "--tool-port", str(tool_port)], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    steps = out.split("=== ")[1:]
    assert len(steps) == 8, out
    allowed, denied, held, approved, retried, again, completed, story = steps
    assert allowed.startswith("1. allowed") and "HTTP 200" in allowed
    assert '"credential": "a sidecar-minted JWT"' in allowed
    assert '"agent\'s own secret reached the tool": false' in allowed
    assert denied.startswith("2. denied") and "HTTP 403" in denied and '"code": "denied"' in denied
    assert "writes need a task" in denied
    assert held.startswith("3. held") and '"code": "approval_required"' in held
    [approval_id] = re.findall(r'"approval_id": "(ap-[^"]+)"', held)

    # 4. a human (not the agent) approves through the real CLI, with the generated development token
    assert approved.startswith("4. approved by a human, dev-approver@example.com")
    assert f"approvals approve {approval_id} --token-file " in approved
    assert f"{approval_id}  approved" in approved
    # 5./6. the retry goes through, exactly once
    assert retried.startswith("5. the retried call went through") and "HTTP 200" in retried
    assert '"times the tool received this call": 1' in retried
    assert again.startswith("6. exactly once") and "HTTP 403" in again and '"code": "approval_used"' in again
    assert "the tool received DELETE /crm/customers/42 1 time(s)" in again
    # 7. completion revokes the task's credentials, as introspection tells the tool
    assert completed.startswith("7. the task is complete") and '"credentials_revoked": true' in completed
    assert "before completion active=True, after completion active=False" in completed
    # 8. the task's story from the audit log
    [task_id] = re.findall(r"Opened task (t-[0-9a-f]+)", out)
    assert story.startswith("8. the task's whole story")
    assert f"audit show --task {task_id} --config {path}" in story
    assert f"Task {task_id}" in story and "chain     verified" in story
    assert 'intent    "look up customer 42 and tidy their record"' in story
    for line in ("TASK      OPENED", "DECISION  ALLOW", "DECISION  HOLD", "APPROVAL  REQUESTED", "APPROVAL  APPROVED",
                 "by dev-approver@example.com", "APPROVAL  USED", "TASK      COMPLETED"):
        assert line in story, line
    # the commands to do it all by hand, the approver page with its token included
    assert "Do each step by hand" in story
    assert "approvals approve ap-... --token-file" in story and "/ui/ and paste the token" in story
    assert f"cat {state / 'dev-approver' / 'approver.token'}" in story
    token = (state / "dev-approver" / "approver.token").read_text().strip()
    assert token not in out  # the demo prints how to read the token, never the token
