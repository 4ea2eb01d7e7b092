"""The Rego test runner (sidecar.policy.testing), and the shipped rego/ library's contract."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opa_bindings")

from sidecar.policy.testing import (  # noqa: E402
    PolicyLoadError,
    TestReport,
    TestResult,
    discover_tests,
    format_report,
    load_policy_dir,
    run_tests,
)

REPO = Path(__file__).resolve().parent.parent
REGO = REPO / "rego"
SCHEMAS = REPO / "sidecar" / "policy" / "schemas"


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


# ---------------------------------------------------------------- the runner


def test_shipped_policy_library_passes() -> None:
    report = run_tests(REGO)
    assert report.failed == 0, format_report(report)
    assert report.passed == len(report.results) >= 40
    assert report.coverage is not None and report.coverage >= 90.0
    text = format_report(report)
    assert f"PASS: {report.passed}/{report.passed}" in text
    assert "FAIL" not in text
    assert "Coverage: " in text


def test_failing_and_erroring_tests_are_counted(tmp_path: Path) -> None:
    write(tmp_path, {
        "policy/authz.rego": "package authz\n\nallow if input.user == \"alice\"\n\nratio := 1 / input.n\n",
        "policy/authz_test.rego": (
            "package authz_test\n\nimport data.authz\n\n"
            "test_alice_allowed if authz.allow with input as {\"user\": \"alice\"}\n\n"
            "test_bob_allowed if authz.allow with input as {\"user\": \"bob\"}\n\n"
            "test_ratio if authz.ratio == 1 with input as {\"n\": 0}\n\n"
            "todo_test_later if false\n"
        ),
    })
    report = run_tests(tmp_path)
    by_name = {r.name: r for r in report.results}
    assert set(by_name) == {"test_alice_allowed", "test_bob_allowed", "test_ratio"}
    assert (report.passed, report.failed, report.errors) == (1, 2, 1)
    assert by_name["test_bob_allowed"].error is None and not by_name["test_bob_allowed"].passed
    assert by_name["test_ratio"].error is not None and "divide by zero" in by_name["test_ratio"].error
    assert all(r.package == "authz_test" and r.duration_ns > 0 for r in report.results)

    text = format_report(report)
    assert "data.authz_test.test_bob_allowed: FAIL (" in text
    assert "data.authz_test.test_ratio: ERROR (" in text
    assert "test_alice_allowed" not in text
    assert "PASS: 1/3" in text and "FAIL: 1/3" in text and "ERROR: 1/3" in text
    verbose = format_report(report, verbose=True)
    assert "data.authz_test.test_alice_allowed: PASS (" in verbose


def test_a_test_must_be_true_not_merely_defined(tmp_path: Path) -> None:
    write(tmp_path, {"p_test.rego": "package p_test\n\ntest_number := 5\n\ntest_true := true\n"})
    report = run_tests(tmp_path, coverage=False)
    assert {r.name: r.passed for r in report.results} == {"test_number": False, "test_true": True}
    assert report.coverage is None


@pytest.mark.parametrize(("name", "source", "named_in"), [
    pytest.param("sub/broken.rego", "package broken\n\nallow if {\n", "broken.rego", id="parse error"),
    pytest.param("typo.rego", "package typo\n\nallow if no_such_function(input)\n", "no_such_function",
                 id="compile error"),
])
def test_a_broken_module_names_the_file(tmp_path: Path, name: str, source: str, named_in: str) -> None:
    write(tmp_path, {"ok.rego": "package ok\n\nx := 1\n", name: source})
    with pytest.raises(PolicyLoadError) as caught:
        run_tests(tmp_path)
    assert caught.value.path.endswith(name)
    assert named_in in str(caught.value)


def test_invalid_data_json_names_the_file(tmp_path: Path) -> None:
    write(tmp_path, {"p.rego": "package p\n\nx := 1\n", "cfg/data.json": "{not json"})
    with pytest.raises(PolicyLoadError) as caught:
        run_tests(tmp_path)
    assert caught.value.path.endswith("cfg/data.json")


def test_data_files_merge_at_their_directory(tmp_path: Path) -> None:
    import opa_bindings

    write(tmp_path, {
        "data.json": json.dumps({"top": 1}),
        "limits/data.json": json.dumps({"max": 5}),
        "limits/extra.data.json": json.dumps({"min": 1}),
        "policy/p.rego": "package p\n\nok if data.top == 1\n",
        ".hidden/ignored.rego": "package ignored\n\nthis is not rego\n",
    })
    engine = opa_bindings.OpaEngine()
    try:
        modules = load_policy_dir(engine, tmp_path)
        assert modules == ["policy/p.rego"]
        assert engine.eval_document("limits") == {"max": 5, "min": 1}
        assert engine.eval_document("top") == 1
        assert engine.eval_document("p.ok") is True
    finally:
        engine.close()


def test_no_rego_files_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyLoadError):
        run_tests(tmp_path)
    with pytest.raises(PolicyLoadError):
        run_tests(tmp_path / "missing")


def test_discover_tests_reads_packages_and_rule_heads() -> None:
    modules = {
        "b/b_test.rego": "package b.b_test\n\ntest_one if true\n\ntest_one if false\n\ntest_two := true\n",
        "a_test.rego": (
            "# test_commented if true\npackage a\n\nimport rego.v1\n\n"
            "test_x if {\n\tx := 1\n\ttest_y := x\n}\n\ntodo_test_skip if true\n\ntest_old {\n\ttrue\n}\n"
            "testing_helper := 1\n"
        ),
        "no_package.rego": "test_z if true\n",
    }
    assert discover_tests(modules) == [
        ("a", "test_x"), ("a", "test_old"), ("b.b_test", "test_one"), ("b.b_test", "test_two"),
    ]


def test_coverage_counts_non_test_modules_only(tmp_path: Path) -> None:
    write(tmp_path, {
        "p.rego": "package p\n\nhit if input.x == 1\n\nmissed if input.x == 2\n",
        "p_test.rego": "package p_test\n\ntest_hit if data.p.hit with input as {\"x\": 1}\n",
    })
    report = run_tests(tmp_path)
    assert report.passed == 1
    assert report.coverage == pytest.approx(50.0)


def test_report_counts() -> None:
    report = TestReport(results=[
        TestResult("p", "test_a", True, None, 1_200_000),
        TestResult("p", "test_b", False, None, 900),
    ], coverage=75.0)
    assert (report.passed, report.failed, report.errors) == (1, 1, 0)
    assert format_report(report) == "\n".join([
        "data.p.test_b: FAIL (0.9µs)",
        "-" * 80,
        "PASS: 1/2",
        "FAIL: 1/2",
        "Coverage: 75.00%",
    ])


# ------------------------------------------- the shipped policy's contract


@pytest.fixture(scope="module")
def engine() -> Any:
    import opa_bindings

    eng = opa_bindings.OpaEngine()
    load_policy_dir(eng, REGO)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def decision_validator() -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((SCHEMAS / "decision.v1.json").read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture(scope="module")
def input_validator() -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((SCHEMAS / "input.v2.json").read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(schema)


ROUTES: dict[str, dict[str, Any]] = {
    "crm": {"host": "127.0.0.1", "labels": {"environment": "dev", "data_classification": "confidential", "reversible": True}},
    "payments": {"host": "127.0.0.1", "labels": {"environment": "prod", "data_classification": "financial", "reversible": False}},
    "publish": {"host": "127.0.0.1", "labels": {"external": True, "environment": "prod"}},
    "tools": {"host": "127.0.0.1", "labels": {}},
}
NOW_NS = 1_748_779_200_000_000_000


def policy_input(method: str, route: str, path: str, body: Any = None, *, task: bool = True,
                 history: dict[str, Any] | None = None, mcp: dict[str, Any] | None = None) -> dict[str, Any]:
    task_doc = {
        "id": "t-19", "intent": "demo", "labels": {}, "allowed_tools": [],
        "created_at": "2025-06-01T11:00:00Z", "expires_at": "2025-06-01T13:00:00Z", "expires_at_epoch": 1748782800,
        "history": history or {"calls": 0, "totals": {"amount": 0, "records": 0}, "recent": {"calls": 0, "at_ms": {}}},
    }
    return {
        "version": "v2",
        "request": {
            "method": method, "scheme": "http", "host": ROUTES[route]["host"], "port": 8080, "path": path,
            "query": {}, "headers": {}, "body": body, "body_sha256": "0" * 64, "body_size": 0,
            "content_type": "application/json", "mode": "route_prefix",
        },
        "tool": {"route": route, "labels": ROUTES[route]["labels"], "upstream": "http://127.0.0.1:8080"},
        "agent": {"id": "spiffe://cluster.local/ns/agents/sa/demo-agent", "verified": False},
        "task": task_doc if task else None,
        "delegation": [],
        "mcp": mcp,
        "approval": None,
        "time": {"now": "2025-06-01T12:00:00.000000Z", "now_ns": NOW_NS},
    }


def mcp_input(tool: str, annotations: dict[str, Any]) -> dict[str, Any]:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": {}}}
    mcp = {"method": "tools/call", "id": 1, "tool": tool, "arguments": {}, "annotations": annotations}
    return policy_input("POST", "tools", "/mcp", body, mcp=mcp)


def outcome(decision: dict[str, Any]) -> str:
    if decision.get("require_approval"):
        return "hold"
    return "allow" if decision["allow"] else "deny"


DEMO_CASES = [
    ("get with task", policy_input("GET", "crm", "/customers/42"), "allow", "low"),
    ("get without task", policy_input("GET", "crm", "/customers/42", task=False), "allow", "low"),
    ("post without task", policy_input("POST", "crm", "/customers", {"name": "Ada"}, task=False), "deny", None),
    ("delete with task", policy_input("DELETE", "crm", "/customers/42"), "hold", "high"),
    ("small refund", policy_input("POST", "payments", "/refunds", {"amount": 49}), "allow", "medium"),
    ("small refund past task total", policy_input(
        "POST", "payments", "/refunds", {"amount": 49}, history={"totals": {"amount": 480}}), "hold", "high"),
    ("large refund", policy_input("POST", "payments", "/refunds", {"amount": 5000}), "hold", "critical"),
    ("external publish", policy_input("POST", "publish", "/posts", {"text": "hi"}), "hold", "high"),
    ("mcp delete_record", mcp_input("delete_record", {}), "hold", "high"),
    ("mcp destructive hint", mcp_input("cleanup", {"destructiveHint": True}), "hold", "high"),
    ("mcp read-only hint", mcp_input("search", {"readOnlyHint": True}), "allow", "low"),
]


@pytest.mark.parametrize("name,document,expected,risk", DEMO_CASES, ids=[c[0] for c in DEMO_CASES])
def test_demo_decisions(engine: Any, decision_validator: Any, input_validator: Any, name: str,
                        document: dict[str, Any], expected: str, risk: str | None) -> None:
    assert not list(input_validator.iter_errors(document)), "the test builds a valid input.v2 document"
    decision = engine.eval_document("sidecar.authz.decision", document)
    assert not [e.message for e in decision_validator.iter_errors(decision)]
    assert outcome(decision) == expected, decision["reasons"]
    if risk is not None:
        assert decision["risk"] == risk
    assert decision["reasons"] and all(r.split(":")[0] in decision["rules"] for r in decision["reasons"])


def test_demo_reasons_name_the_numbers(engine: Any) -> None:
    denied = engine.eval_document("sidecar.authz.decision", DEMO_CASES[2][1])
    assert any("writes need a task" in r for r in denied["reasons"])
    held = engine.eval_document("sidecar.authz.decision", DEMO_CASES[5][1])
    assert "task_amount_threshold: amounts in task t-19 total 529 > 500 (earlier 480 + this call 49)" in held["reasons"]
    large = engine.eval_document("sidecar.authz.decision", DEMO_CASES[6][1])
    assert large["approval"]["approvers"] == 2
    assert large["credential"] == {"audience": "payments", "scopes": ["payments:write"], "ttl_seconds": 10}


RICH_INPUT: dict[str, Any] = {
    **policy_input("POST", "payments", "/refunds", {"amount": 49, "records": [1, 2], "limit": 3}, history={
        "calls": 3, "by_route": {"crm": 3}, "by_method": {"GET": 3}, "totals": {"amount": 480, "records": 5},
        "external_hosts_written": ["api.example.com"], "classifications_read": ["confidential"],
        "recent": {"calls": 20, "at_ms": {"allow": [1_748_779_199_000] * 18, "deny": [1_748_779_199_500] * 2}},
        "in_flight": {"calls": 1, "totals": {"amount": 49}},
    }),
    "mcp": {"method": "tools/call", "id": 1, "tool": "refund", "arguments": {"amount": 5},
            "annotations": {"readOnlyHint": True}},
    "approval": {"id": "ap-1", "status": "approved", "approvals": [{"approver": "bob"}]},
}
GARBAGE: list[Any] = [None, True, False, 0, -1, 1.5, 10**30, "", "x", "2025-02-29T00:00:00Z", "1e5", "-0.5",
                      "99999999999999999999", "DELETE", "tools/call", "(", [], [1, "a", None], {}, {"a": 1}]


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value[:2]):
            found += _paths(item, prefix + (index,))
    return found


def test_decision_always_defined_and_valid_on_malformed_input(engine: Any, decision_validator: Any) -> None:
    """The embedded engine raises on builtin type errors: no input shape may break the policy."""
    rng = random.Random(6)
    paths = [p for p in _paths(RICH_INPUT) if p]
    for _ in range(400):
        document = json.loads(json.dumps(RICH_INPUT))
        for path in rng.sample(paths, rng.randint(1, 4)):
            parent = document
            try:
                for key in path[:-1]:
                    parent = parent[key]
                parent[path[-1]] = rng.choice(GARBAGE)
            except (KeyError, IndexError, TypeError):
                continue
        decision = engine.eval_document("sidecar.authz.decision", document)
        errors = [e.message for e in decision_validator.iter_errors(decision)]
        assert not errors, (document, decision)
