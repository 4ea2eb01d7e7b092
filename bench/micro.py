"""Micro-benchmarks of each step of the request path, in this process, on a typical call inside a task."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sidecar.audit import HashChainLog
from sidecar.config import Route, RouteMatch
from sidecar.context import AgentIdentity, build_input
from sidecar.credentials import JwtMinter, KeyRing, generate_key
from sidecar.documents import InterceptedCall
from sidecar.policy.decide import decision_errors, to_decision
from sidecar.policy.embedded import EmbeddedEngine
from sidecar.tasks.store import CallRecord, Task, TaskSummary, iso_ms

DECISION_PATH = "sidecar/authz/decision"
AGENT = AgentIdentity("spiffe://bench/ns/agents/sa/bench-agent", verified=False)
ROUTE = Route(name="crm", match=RouteMatch(path_prefix="/crm"), upstream="http://127.0.0.1:18080/crm",
              labels={"environment": "dev", "data_classification": "confidential"})


def typical_call() -> InterceptedCall:
    return InterceptedCall(
        route=ROUTE, mode="route_prefix", method="GET", scheme="http", host="127.0.0.1", port=18080,
        path="/crm/customers/42", query_string="fields=name,tier", query={"fields": ["name,tier"]},
        headers=(("Accept", "application/json"), ("User-Agent", "bench-agent/1.0")), body=b"", body_json=None,
        body_sha256="e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        content_type="", task_id="t-0123456789abcdef",
    )


def typical_task(now: float) -> dict[str, Any]:
    """A task 20 calls in (the history's full window), spread over the last minute; as the pipeline hands it
    to build_input (the task store's policy view, input v2)."""
    task = Task(id="t-0123456789abcdef", agent=AGENT.id, intent="answer the customer's ticket about invoice 7",
                labels={}, created_at=now - 120, expires_at=now + 600)
    summary = TaskSummary()
    for n in range(20):
        method = "GET" if n % 3 else "POST"
        summary.add(CallRecord(route="crm", method=method, path=f"/crm/customers/{n}", host="127.0.0.1",
                               outcome="allow", at=iso_ms(now - 60 + n * 3), classification="confidential",
                               write=method != "GET"))
    return task.as_policy_input(summary)


def timed(step: Callable[[], Any], count: int, warmup: int = 50) -> dict[str, float]:
    for _ in range(warmup):
        step()
    samples = []
    clock = time.perf_counter_ns
    for _ in range(count):
        started = clock()
        step()
        samples.append(clock() - started)
    return summarize_ns(samples)


def summarize_ns(samples: list[int]) -> dict[str, float]:
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0

    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99), "max": ordered[-1] / 1000.0,
            "mean": sum(ordered) / len(ordered) / 1000.0, "count": len(ordered)}


def run_micro(rego_dir: Path, count: int) -> dict[str, dict[str, float]]:
    """Per-step cost in microseconds: p50, p90, p99, max, mean."""
    results: dict[str, dict[str, float]] = {}
    call = typical_call()
    task = typical_task(time.time())
    document = build_input(call, AGENT, task)
    engine = EmbeddedEngine(rego_dir)
    try:
        result = engine.evaluate_sync(DECISION_PATH, document)
        results["build policy input"] = timed(lambda: build_input(call, AGENT, task), count)
        results["policy evaluation (embedded)"] = timed(lambda: engine.evaluate_sync(DECISION_PATH, document), count)
    finally:
        engine.close_now()
    results["decision validation (schema)"] = timed(lambda: decision_errors(result), count)
    decision = to_decision("d-bench", result, 0)
    with tempfile.TemporaryDirectory(prefix="bench-micro-") as tmp:
        for algorithm in ("ES256", "EdDSA"):
            keys_dir = Path(tmp) / algorithm
            generate_key(keys_dir, algorithm)
            minter = JwtMinter(KeyRing(keys_dir), issuer="agent-sidecar", max_ttl_seconds=300, default_ttl_seconds=60)
            results[f"mint JWT ({algorithm})"] = timed(
                lambda: minter.mint(call, decision, subject=AGENT.id, task=task, delegation=[], approval_id=None), count)
        audit = HashChainLog(Path(tmp) / "audit.jsonl")
        event = {"type": "decision", "decision_id": "d-bench", "path": DECISION_PATH, "input": document,
                 "result": result, "outcome": "allow", "route": "crm", "agent": AGENT.id, "task_id": task["id"],
                 "jti": "0" * 32, "reasons": list(decision.reasons)}
        results["audit append (decision event)"] = timed(lambda: audit.append(event), count)
        results["audit append (upstream event)"] = timed(
            lambda: audit.append({"type": "upstream", "decision_id": "d-bench", "task_id": task["id"],
                                  "route": "crm", "status": 200, "bytes": 80}), count)
        audit.close()
    return results
