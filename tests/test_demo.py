"""`make run`'s demo, played once against the shipped rego/ library and examples/demo.yaml: the whole
story, from an allowed call to a human approval, the retry going through once, the same task through
MCP (the SDK's client and server: list, an allowed read tool, a destructive tool held, approved and run
once), the task's completion revoking its credentials, and the task's audit story."""

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
    tool_port, mcp_port = free_port(), free_port()
    state = tmp_path / "state"
    config["listeners"] = {name: f"127.0.0.1:{free_port()}" for name in ("proxy", "admin", "metrics")}
    config["state_dir"] = str(state)
    config["policy"]["rego_dir"] = str(ROOT / "rego")
    config["approvals"]["approvers"]["jwks"] = str(state / "dev-approver" / "jwks.json")
    config["introspection"]["tokens_file"] = str(state / "dev-introspection.token")
    for route in config["routes"]:
        route["upstream"] = route["upstream"].replace(":18080", f":{tool_port}").replace(":18081", f":{mcp_port}")
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "sidecar.demo", "--once", "--config", str(path),
                             "--tool-port", str(tool_port), "--mcp-port", str(mcp_port)],
                            capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    steps = out.split("=== ")[1:]
    assert len(steps) == 13, out
    allowed, denied, held, approved, retried, again, listed, read, mcp_held, mcp_approved, mcp_retried, completed, story \
        = steps
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
    # 7.-11. the same task through MCP, with the SDK's client against the SDK's server behind the sidecar
    assert f"demo MCP server on http://127.0.0.1:{mcp_port}/mcp" in out
    assert "tools/mcp  {\"id\": 1, \"method\": \"initialize\"}" in again  # the handshake, printed as sent
    assert listed.startswith("7. MCP tools/list") and '"method": "tools/list"' in again
    assert "get_customer: 'Look a customer up by id.'  server's hints {\"readOnlyHint\": true}" in listed
    assert "delete_customer: 'Delete a customer record for good.'  server's hints {\"destructiveHint\": true}" in listed
    assert '"params": {"name": "get_customer", "arguments": {"customer_id": 7}}' in listed  # sent, then judged
    assert read.startswith("8. MCP allowed") and "<-- CallToolResult isError=False" in read
    assert '"name": "Ada Lovelace"' in read and "the MCP server ran get_customer(customer_id=7) 1 time(s)" in read
    assert mcp_held.startswith("9. MCP held for human approval") and "<-- CallToolResult isError=True" in mcp_held
    [mcp_approval] = re.findall(r"text: waiting for human approval (ap-[0-9a-f]+); call the same tool", mcp_held)
    assert mcp_approval != approval_id and f'"code": "approval_required", "approval_id": "{mcp_approval}"' in mcp_held
    assert "the MCP server ran delete_customer(customer_id=7) 0 time(s)" in mcp_held
    assert mcp_approved.startswith("10. approved by a human, dev-approver@example.com")
    assert f"approvals approve {mcp_approval} --token-file " in mcp_approved and f"{mcp_approval}  approved" in mcp_approved
    [held_id] = re.findall(r'"id": (\d+), "method": "tools/call", "params": {"name": "delete_customer"', read)
    [retry_id] = re.findall(r'"id": (\d+), "method": "tools/call", "params": {"name": "delete_customer"', mcp_approved)
    assert retry_id != held_id  # a plain retry: a new JSON-RPC id, no approval header
    assert mcp_retried.startswith("11. MCP approved call went through") and "isError=False" in mcp_retried
    assert "text: deleted customer 7 (this tool ran delete_customer for it 1 time(s))" in mcp_retried
    assert "the MCP server ran delete_customer(customer_id=7) 1 time(s)" in mcp_retried
    # 12. completion revokes the task's credentials, as introspection tells the tool
    assert completed.startswith("12. the task is complete") and '"credentials_revoked": true' in completed
    assert "before completion active=True, after completion active=False" in completed
    # 13. the task's story from the audit log, the MCP calls in it
    [task_id] = re.findall(r"Opened task (t-[0-9a-f]+)", out)
    assert story.startswith("13. the task's whole story")
    assert f"audit show --task {task_id} --config {path}" in story
    assert f"Task {task_id}" in story and "chain     verified" in story
    assert 'intent    "look up customers 42 and 7 and tidy their records"' in story
    for line in ("TASK      OPENED", "DECISION  ALLOW", "DECISION  HOLD", "APPROVAL  REQUESTED", "APPROVAL  APPROVED",
                 "by dev-approver@example.com", "APPROVAL  USED", "TASK      COMPLETED", "mcp tool get_customer",
                 f"approval {mcp_approval}", 'by dev-approver@example.com (1/1): "customer 7 duplicates 42"'):
        assert line in story, line
    assert story.count("APPROVAL  USED") == 2 and story.count("mcp tool delete_customer") == 2  # held, then allowed
    # the commands to do it all by hand, the approver page with its token included
    assert "Do each step by hand" in story
    assert "approvals approve ap-... --token-file" in story and "/ui/ and paste the token" in story
    assert "/tools/mcp -H 'content-type: application/json'" in story and '"name": "delete_customer"' in story
    assert f"cat {state / 'dev-approver' / 'approver.token'}" in story
    token = (state / "dev-approver" / "approver.token").read_text().strip()
    assert token not in out  # the demo prints how to read the token, never the token
