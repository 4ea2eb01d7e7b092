"""Differential check of two versions of the policy library: thousands of varied inputs, whole decisions compared.

    python -m bench.policy_differential --old <git revision> [--new rego/] [--count 2000] [--seed 17]

A change made for cost must not change a decision. The library at ``--old`` (read from git) and the
one at ``--new`` (a directory) are each loaded twice: as the sidecar's embedded engine loads them
(sidecar.policy.embedded.set_runtime_data: the data checked once, ``data.sidecar.runtime`` set) and
bare, as an OPA server holds them (nothing set: the data checked and everything derived per call).
Every input is evaluated on all four, under the shipped data and under variants of its knobs, and
the whole decision documents (or the error kind) must be equal. Inputs: the decision vectors
(tests/vectors/decisions/library.json), bench.micro's typical call, generated calls over the routes,
methods, bodies, queries, MCP calls, approvals and tasks the library distinguishes (task expiries
and rate-window times on the edges), and each of those with up to three fields replaced by garbage.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import random
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sidecar.jsoncodec import JsonDocument
from sidecar.policy.embedded import _evaluate_on, new_engine, set_runtime_data
from sidecar.policy.engine import PolicyError
from sidecar.policy.loader import PolicyBundle, read_policy_dir

ROOT = Path(__file__).resolve().parent.parent
DECISION = "sidecar/authz/decision"
NOW_NS = 1_795_784_462_347_076_082
NOW_MS = NOW_NS // 1_000_000

ROUTES = {
    "crm": {"environment": "dev", "data_classification": "confidential"},
    "payments": {"environment": "prod", "data_classification": "financial", "reversible": False},
    "publish": {"external": True, "environment": "prod"},
    "mcp": {"protocol": "mcp"},
    "mcp-open": {},
    "iam": {"environment": "prod"},
    "search": {"data_classification": "public"},
    "partner": {"external": False},
    "wiki": {"data_classification": "unheard-of"},
}
HOSTS = ["crm.internal", "127.0.0.1", "api.example.com", "payments.svc", "10.1.2.3", "8.8.8.8", "", "Tools.Internal"]
PATHS = ["/customers/42", "/customers", "/refunds", "/payments/7", "/posts", "/iam/roles", "/mcp", "/policies", "/",
         "/Transfers/1", "/publish"]
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "get", "Delete"]
GARBAGE: list[Any] = [None, "", 0, -1, 1.5, 10**15, 1e300, -1e-9, True, False, "x" * 200, [], {}, ["allow"], {"a": 1},
                      "2025-02-30T00:00:00Z", "Limit", "DELETE", "*", "confidential", [1, "a", None], "12.5"]

# Knob variants (each passes the library's data check, as the embedded engine refuses data that does not):
# the derived values (approval, TTL, audiences, agent routes, query parameters, outcomes) differ.
CONFIG_VARIANTS: list[dict[str, Any]] = [
    {},
    {"audiences": {"crm": "https://crm.example.com", "search": "", "payments": 7},
     "agent_routes": {"spiffe://cluster.local/ns/agents/sa/billing-agent": ["payments", "crm", 3], "*": ["crm"]},
     "records_query_params": ["ROWS", "limit", "Per_Page"],
     "ttl_seconds": {"low": 86401.5, "medium": 0.5, "high": 45, "critical": 10},
     "approval": {"low": {"approvers": 11, "group": "", "expires_in_seconds": 3600},
                  "medium": {"approvers": 1, "group": "ops", "expires_in_seconds": 10**7},
                  "high": {"approvers": 2.7, "group": "dba", "expires_in_seconds": -1},
                  "critical": {"approvers": 2, "group": "sec", "expires_in_seconds": 900}},
     "anomalies": {"max_calls_per_task": 50, "rate_window_seconds": 1.5, "max_calls_in_window": 3,
                   "rate_outcomes": ["allow", "hold"], "max_denied_in_recent": 2, "denied_outcomes": ["deny", "hold"]}},
    {"agent_routes": {"spiffe://cluster.local/ns/agents/sa/billing-agent": ["*"], "*": []},
     "ttl_seconds": {"low": 600, "medium": 120, "high": 30, "critical": 1},
     "anomalies": {"max_calls_per_task": 5000, "rate_window_seconds": 2, "max_calls_in_window": 1,
                   "rate_outcomes": ["hold"], "max_denied_in_recent": 0, "denied_outcomes": []}},
]


def old_library(revision: str, into: Path) -> Path:
    """The rego/ tree at a git revision, written under ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "rego"], check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / "rego"


def with_config(bundle: PolicyBundle, overrides: dict[str, Any]) -> PolicyBundle:
    data = []
    for path, value, file in bundle.data:
        value = copy.deepcopy(value)
        config = value.get("sidecar", {}).get("config") if path == "" and isinstance(value, dict) else None
        if isinstance(config, dict):
            for key, override in overrides.items():
                if isinstance(override, dict) and isinstance(config.get(key), dict) and key == "anomalies":
                    config[key] = {**config[key], **override}
                else:
                    config[key] = override
        data.append((path, value, file))
    return PolicyBundle(root=bundle.root, modules=dict(bundle.modules), data=data)


def engines(bundle: PolicyBundle) -> tuple[Any, Any]:
    """(as the sidecar loads it, as an OPA server holds it)."""
    embedded = new_engine(bundle)
    set_runtime_data(embedded, bundle, DECISION)
    return embedded, new_engine(bundle)


def evaluate(engine: Any, document: dict[str, Any]) -> Any:
    try:
        return _evaluate_on(engine, DECISION, JsonDocument(document))[0]
    except PolicyError as exc:
        return {"policy_error": exc.kind}


def task(rng: random.Random) -> dict[str, Any]:
    now_s = NOW_NS / 1e9
    expiry = rng.choice([now_s + 600, now_s + 300, now_s + 299.5, now_s + 120.2, now_s + 30, now_s + 29.99, now_s + 10,
                         now_s + 0.5, now_s - 1, now_s + 86401, 4102444800])
    window_ms = rng.choice([2000, 1500, 1000])
    if rng.random() < 0.4:  # the rate rule's edge: the oldest of 18-20 allowed calls just inside or outside the window
        edge = rng.choice([window_ms - 1, window_ms, window_ms + 1])
        inside = [NOW_MS - rng.randint(0, edge - 1) for _ in range(rng.choice([17, 18, 19]))]
        allow_times = sorted([NOW_MS - edge, *inside])
    else:
        allow_times = sorted(NOW_MS - rng.choice([0, 1, window_ms - 1, window_ms, window_ms + 1, 5000, 60000])
                             for _ in range(rng.randint(0, 20)))
    deny_times = sorted(NOW_MS - rng.randint(0, 60000) for _ in range(rng.choice([0, 0, 0, 1, 2, 5, 6])))
    hold_times = sorted(NOW_MS - rng.choice([1, window_ms, window_ms + 1]) for _ in range(rng.randint(0, 4)))
    at_ms = {k: v for k, v in (("allow", allow_times), ("deny", deny_times), ("hold", hold_times)) if v}
    calls = rng.choice([0, 3, 20, 20, 49, 50, 4999, 5000])
    document: dict[str, Any] = {
        "id": rng.choice(["t-19", "t-" + "9" * 150]),
        "intent": "refund duplicate charges",
        "labels": rng.choice([{}, {}, {}, {"allowed_routes": ["crm"]}, {"allowed_routes": ["crm", "payments", "mcp"]}]),
        "allowed_tools": rng.choice([[], [], [], ["crm"], ["mcp:delete_record", "get_customer"], ["Payments"]]),
        "created_at": "2026-11-27T12:00:00Z",
        "expires_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expiry)),
        "expires_at_epoch": expiry,
        "status": "open",
        "history": {
            "calls": calls,
            "by_route": {"crm": calls},
            "by_method": {"GET": calls},
            "by_tool": {},
            "totals": {"amount": rng.choice([0, 0.0, 0, 49, 480, 501]), "records": rng.choice([0, 0, 10, 995, 1001])},
            "external_hosts_written": rng.choice([[], ["api.example.com"]]),
            "classifications_read": rng.choice([[], ["confidential"], ["Financial", "public"], ["PII"]]),
            "recent": {"calls": min(calls, 20), "at_ms": at_ms},
            "in_flight": {"calls": 0, "totals": {}},
        },
    }
    if rng.random() < 0.2:
        del document["expires_at_epoch"]
    return document


def generated(rng: random.Random) -> dict[str, Any]:
    route = rng.choice(list(ROUTES))
    method = rng.choice(METHODS + ["GET"] * 6)
    amount = rng.choice([5, 49, 50, 51, 999, 1001, "60", -70])
    body: Any = rng.choice([None, None, None, None, {"name": "Ada"}, {"amount": amount}, {"Amount": 20, "records": 150},
                            [{"amount": 30}, {"amount": 30}], {"ids": list(range(120))}, {"limit": "500"}, "text"])
    query = rng.choice([{}, {"fields": ["name,tier"]}, {"limit": ["500"]}, {"Limit": ["50"], "PAGE_SIZE": ["101"]},
                        {"amount": ["70"]}, {"rows": ["1000"]}, {"per_page": ["x"]}])
    document: dict[str, Any] = {
        "version": "v2",
        "request": {"method": method, "scheme": "http", "host": rng.choice(HOSTS), "port": 80,
                    "path": rng.choice(PATHS), "query": query, "raw_query": "", "headers": {"accept": "*/*"},
                    "body": body, "body_readable": rng.random() > 0.1, "body_sha256": "0" * 64, "body_size": 0,
                    "content_type": "application/json", "mode": "route_prefix",
                    "measures": rng.choice([{}, {}, {"amount": 70}, {"records": 2000}, {"amount": -1}])},
        "tool": {"route": route, "labels": ROUTES[route], "upstream": "http://x", "protocol": "http",
                 "measures": rng.choice([[], [{"name": "amount", "path": "$.amount"}]])},
        "mcp": None,
        "agent": {"id": rng.choice(["spiffe://cluster.local/ns/agents/sa/billing-agent", "other", "*", ""]),
                  "verified": True},
        "task": task(rng) if rng.random() < 0.8 else None,
        "delegation": [],
        "approval": None,
        "time": {"now": "2026-11-27T13:01:02.347076Z", "now_ns": NOW_NS},
    }
    if route.startswith("mcp") and rng.random() < 0.8:
        tool = rng.choice(["delete_record", "get_customer", "refund_payment", "publish_post", "set_policy",
                           "DROP_table"])
        mcp_method = rng.choice(["tools/call", "tools/call", "tools/list", "initialize", "resources/read"])
        document["request"]["method"] = "POST"
        document["mcp"] = {"method": mcp_method, "id": 1, "tool": tool if mcp_method == "tools/call" else None,
                           "arguments": rng.choice([{}, {"amount": 70}, {"records": 500}]),
                           "annotations": rng.choice([{}, {"readOnlyHint": True}, {"destructiveHint": True}]),
                           "tool_changed": rng.choice([None, {"fields": ["description"]}])}
    if rng.random() < 0.15:
        document["approval"] = {"id": "ap-1", "status": rng.choice(["approved", "pending"]),
                                "approvals": rng.choice([[{"approver": "alice"}], [{"approver": "alice"}, "bob"], []])}
    return document


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(value, dict):
        for key, child in value.items():
            yield (*prefix, key)
            yield from paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value[:3]):
            yield (*prefix, index)
            yield from paths(child, (*prefix, index))


def garbled(rng: random.Random, document: dict[str, Any]) -> dict[str, Any]:
    document = copy.deepcopy(document)
    for _ in range(rng.randint(1, 3)):
        candidates = list(paths(document))
        if not candidates:
            break
        where = rng.choice(candidates)
        parent: Any = document
        for step in where[:-1]:
            parent = parent[step]
        parent[where[-1]] = copy.deepcopy(rng.choice(GARBAGE))
    return document


def inputs(rng: random.Random, count: int) -> list[dict[str, Any]]:
    from .micro import AGENT, typical_call, typical_task
    from sidecar.context import build_input

    vectors = json.loads((ROOT / "tests" / "vectors" / "decisions" / "library.json").read_text())
    base = [{"version": "v2", **case["input"]} for case in vectors["cases"]]
    base.append(json.loads(json.dumps(build_input(typical_call(), AGENT, typical_task(NOW_NS / 1e9), now_ns=NOW_NS))))
    documents = list(base)
    while len(documents) < count:
        source = generated(rng) if rng.random() < 0.7 else copy.deepcopy(rng.choice(base))
        documents.append(garbled(rng, source) if rng.random() < 0.4 else source)
    return documents


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="git revision of the library to compare with")
    parser.add_argument("--new", type=Path, default=ROOT / "rego")
    parser.add_argument("--count", type=int, default=2000, help="inputs per knob variant")
    parser.add_argument("--seed", type=int, default=17)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    documents = inputs(rng, args.count)
    compared = differences = 0
    outcomes: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="policy-differential-") as tmp:
        old_bundle, new_bundle = read_policy_dir(old_library(args.old, Path(tmp))), read_policy_dir(args.new)
        for variant, overrides in enumerate(CONFIG_VARIANTS):
            old_embedded, old_server = engines(with_config(old_bundle, overrides))
            new_embedded, new_server = engines(with_config(new_bundle, overrides))
            for document in documents:
                reference = evaluate(old_embedded, document)
                for name, engine in (("old bare", old_server), ("new embedded", new_embedded),
                                     ("new bare", new_server)):
                    got = evaluate(engine, document)
                    compared += 1
                    if got != reference:
                        differences += 1
                        if differences <= 5:
                            print(f"DIFFERENT ({name}, knobs {variant}): {json.dumps(document)[:600]}\n"
                                  f"  old embedded: {json.dumps(reference)}\n  {name}: {json.dumps(got)}")
                key = reference.get("policy_error") or ("hold" if reference.get("require_approval")
                                                        else "allow" if reference.get("allow") else "deny")
                outcomes[key] = outcomes.get(key, 0) + 1
            for engine in (old_embedded, old_server, new_embedded, new_server):
                engine.close()
    print(f"{len(documents)} inputs x {len(CONFIG_VARIANTS)} knob variants = {len(documents) * len(CONFIG_VARIANTS)} "
          f"decisions by the old library (as loaded by the sidecar), each compared with the old one bare and the new "
          f"one loaded both ways: {compared} comparisons, {differences} different; outcomes {outcomes}")
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
