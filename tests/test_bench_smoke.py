"""The benchmark with tiny counts, so that it cannot rot: it runs and writes a well-formed report.

Real parts throughout (separate processes for the upstream, nginx, the OPA Data API server, both
sidecars and the load generator, all on loopback). Nothing here asserts a timing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_smoke_run_writes_a_well_formed_report(tmp_path: Path) -> None:
    report = tmp_path / "performance.md"
    report.write_text("# Performance\n\nHand-written text that the run must keep.\n")
    raw = tmp_path / "results.json"
    done = subprocess.run([sys.executable, "-m", "bench.run", "--smoke", "--out", str(report), "--json", str(raw)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    text = report.read_text()
    assert "Hand-written text that the run must keep." in text
    assert "<!-- bench:begin" in text and "<!-- bench:end -->" in text
    for heading in ("### Latency", "### Throughput", "### CPU per 1,000 calls", "### Memory", "### Request-path steps",
                    "### Targets"):
        assert heading in text
    assert "Machine: cpus" in text and "Versions: python" in text

    results = json.loads(raw.read_text())
    variants = results["meta"]["variants"]
    assert {"direct", "sidecar-embedded", "sidecar-rest"} <= set(variants)
    for name in variants:
        assert results["concurrency_1"][name]["count"] > 0
        assert results["fixed_rate"][name]["count"] > 0
        assert results["rising_rates"][name]
    for step in ("policy evaluation (embedded)", "mint JWT (ES256)", "audit append (decision event)"):
        assert results["micro"][step]["count"] > 0
    for name in ("sidecar-embedded", "sidecar-rest"):
        assert results["memory"][name]["rest_mib"] > 0
        assert results["cpu"][name]["calls"] > 0

    # A second run replaces its own section and keeps the rest.
    again = subprocess.run([sys.executable, "-m", "bench.run", "--smoke", "--out", str(report)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert report.read_text().count("<!-- bench:begin") == 1


def test_policy_cost_script_evaluates_the_library(tmp_path: Path) -> None:
    """bench.policy_cost runs this script under valgrind (not installed for the tests); here it runs bare, once."""
    from bench.policy_cost import EVALUATE

    document = tmp_path / "input.json"
    document.write_text("{}")
    for checked in ("1", "0"):
        done = subprocess.run([sys.executable, "-c", EVALUATE, str(ROOT / "rego"), "sidecar.authz.decision", "2",
                               str(document), checked], cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
        assert done.returncode == 0, done.stderr[-2000:]
