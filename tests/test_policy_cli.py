"""`agent-sidecar policy eval` and `policy test`, run as the real command in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness import FIXTURE_POLICY, ROOT, SHIPPED_POLICY
from sidecar.app import probe_input

pytest.importorskip("opa_bindings")


def agent_sidecar(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)


def refund_input(*, amount: float, earlier: float) -> dict[str, Any]:
    """A complete input.v2 document: a refund in a task whose history already moved ``earlier``."""
    document = probe_input()
    document["request"].update(method="POST", host="payments.internal", path="/payments/refunds",
                               body={"amount": amount}, content_type="application/json")
    document["tool"] = {"route": "payments", "labels": {"environment": "prod", "reversible": False},
                        "upstream": "http://payments.internal"}
    document["task"] = {"id": "t-19", "intent": "refund duplicate charges", "labels": {}, "allowed_tools": [],
                        "created_at": "2025-06-01T11:00:00Z", "expires_at": "2099-06-01T13:00:00Z",
                        "expires_at_epoch": 4084002000, "history": {"calls": 10, "totals": {"amount": earlier, "records": 0}}}
    return document


def write_json(path: Path, document: Any) -> Path:
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def test_eval_explains_a_held_call(tmp_path: Path) -> None:
    result = agent_sidecar("policy", "eval", "--input", str(write_json(tmp_path / "in.json", refund_input(amount=49, earlier=480))))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("outcome: hold")
    assert "risk: high" in out
    assert "  - task_amount_threshold: amounts in task t-19 total 529 > 500 (earlier 480 + this call 49)" in out
    assert "  - production_write: " in out
    assert "credential: audience payments, scopes payments:write, ttl 30 s" in out
    assert "approval: 1 distinct approver(s) from group approvers, expires in 1800 s" in out
    assert "obligations: none" in out and "contract errors: none" in out


def test_eval_explains_a_critical_hold_with_two_approvers(tmp_path: Path) -> None:
    document = {"input": refund_input(amount=5000, earlier=0)}  # OPA's wrapped form is accepted too
    result = agent_sidecar("policy", "eval", "--input", str(write_json(tmp_path / "in.json", document)))
    assert result.returncode == 0, result.stderr
    assert "risk: critical" in result.stdout
    assert "  - critical_amount: POST /payments/refunds on payments moves 5000 > critical amount 1000" in result.stdout
    assert "approval: 2 distinct approver(s) from group approvers, expires in 900 s" in result.stdout
    assert "obligations: audit_alert" in result.stdout


def test_eval_json_carries_decision_and_explanation(tmp_path: Path) -> None:
    path = write_json(tmp_path / "in.json", refund_input(amount=10, earlier=0))
    result = agent_sidecar("policy", "eval", "--json", "--input", str(path), "--dir", str(SHIPPED_POLICY))
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["decision"]["allow"] is True and doc["contract_errors"] == [] and doc["input_errors"] == []
    explanation = doc["explanation"]
    assert explanation["outcome"] == "allow"
    assert explanation["credential"]["ttl_seconds"] == 120
    assert {"rule": "allowed", "reason": explanation["findings"][-1]["reason"]} == explanation["findings"][-1]


def test_eval_exits_non_zero_on_a_malformed_decision(tmp_path: Path) -> None:
    document = probe_input()
    document["request"]["path"] = "/crm/fault/malformed"
    path = write_json(tmp_path / "in.json", document)
    result = agent_sidecar("policy", "eval", "--input", str(path), "--dir", str(FIXTURE_POLICY))
    assert result.returncode == 1
    assert result.stdout.startswith("outcome: invalid")
    assert "  - decision allow: 'yes' is not of type 'boolean'" in result.stdout


def test_eval_exits_non_zero_on_an_input_the_sidecar_never_sends(tmp_path: Path) -> None:
    document = refund_input(amount=10, earlier=0)
    del document["agent"]
    result = agent_sidecar("policy", "eval", "--input", str(write_json(tmp_path / "in.json", document)))
    assert result.returncode == 1
    assert "  - input (root): 'agent' is a required property" in result.stdout


def test_eval_unreadable_input_exits_2(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text("{not json")
    result = agent_sidecar("policy", "eval", "--input", str(tmp_path / "broken.json"))
    assert result.returncode == 2 and "cannot read JSON input" in result.stderr
    missing = agent_sidecar("policy", "eval", "--input", str(tmp_path / "in.json"), "--dir", str(tmp_path / "nowhere"))
    assert missing.returncode == 2


POLICY = """package demo

allow if input.ok
"""

PASSING = """package demo_test

import data.demo

test_ok if demo.allow with input as {"ok": true}
"""

FAILING = """package demo_test

import data.demo

test_ok if demo.allow with input as {"ok": true}

test_wrong if demo.allow with input as {"ok": false}
"""


def policy_dir(root: Path, tests: str) -> Path:
    (root / "demo").mkdir(parents=True)
    (root / "demo" / "demo.rego").write_text(POLICY)
    (root / "demo" / "demo_test.rego").write_text(tests)
    return root


def test_policy_test_exits_zero_when_every_test_passes(tmp_path: Path) -> None:
    result = agent_sidecar("policy", "test", str(policy_dir(tmp_path, PASSING)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS: 1/1" in result.stdout


def test_policy_test_exits_non_zero_on_a_failing_test(tmp_path: Path) -> None:
    result = agent_sidecar("policy", "test", str(policy_dir(tmp_path, FAILING)))
    assert result.returncode == 1
    assert "data.demo_test.test_wrong: FAIL" in result.stdout
    assert "PASS: 1/2" in result.stdout and "FAIL: 1/2" in result.stdout


def test_policy_test_exits_non_zero_on_a_broken_module(tmp_path: Path) -> None:
    root = policy_dir(tmp_path, "package demo_test\n\ntest_x if {\n")
    result = agent_sidecar("policy", "test", str(root))
    assert result.returncode != 0
    assert "demo_test.rego" in result.stdout + result.stderr


def test_shipped_library_passes_through_the_command() -> None:
    result = agent_sidecar("policy", "test", "rego")
    assert result.returncode == 0, result.stdout[-2000:]
    assert "FAIL" not in result.stdout


def test_eval_names_an_input_of_the_previous_contract_version(tmp_path: Path) -> None:
    document = refund_input(amount=10, earlier=0)
    document["version"] = "v1"
    result = agent_sidecar("policy", "eval", "--input", str(write_json(tmp_path / "in.json", document)))
    assert result.returncode == 1, result.stderr
    assert "  - malformed_input: input is not a v2 document; denied" in result.stdout
    assert "  - input version: an input v1 document; this sidecar sends input v2" in result.stdout
