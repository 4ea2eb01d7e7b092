"""One table of decision cases through both engines: embedded OPA and the OPA REST Data API client.

The REST side runs over a real socket against OpaDataApiServer (tests/harness.py), which speaks
OPA's Data API on top of the embedded engine, because no `opa` binary can be installed here.
Set OPA_URL=http://127.0.0.1:8181 to run the REST side against a real `opa run --server` instead.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from harness import ROOT, OpaDataApiServer
from sidecar.app import probe_input
from sidecar.policy import Decider, PolicyEngine
from sidecar.policy.embedded import EmbeddedEngine
from sidecar.policy.rest import RestEngine
from sidecar.problems import Refusal

VECTORS = sorted((ROOT / "tests" / "vectors" / "decisions").glob("*.json"))


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def cases() -> list[Any]:
    params = []
    for path in VECTORS:
        table = json.loads(path.read_text())
        for case in table["cases"]:
            params.append(pytest.param(table["policy"], case, id=f"{path.stem}: {case['name']}"))
    return params


def contains(whole: Any, part: Any) -> bool:
    """Every field of ``part`` is in ``whole`` with the same value (objects compared field by field)."""
    if isinstance(part, dict):
        return isinstance(whole, dict) and all(k in whole and contains(whole[k], v) for k, v in part.items())
    return bool(whole == part)


def policy_with_data(policy_dir: Path, data: dict[str, Any] | None, tmp: Path) -> Path:
    """A case's "data" override, merged into a copy of the policy's data.json (lists are replaced)."""
    if not data:
        return policy_dir
    target = tmp / f"policy-{sum(1 for _ in tmp.iterdir())}"
    shutil.copytree(policy_dir, target)
    data_file = target / "data.json"
    data_file.write_text(json.dumps(merge(json.loads(data_file.read_text()), data)))
    return target


async def decide(engine: PolicyEngine, case: dict[str, Any]) -> tuple[str, Any, dict[str, Any]]:
    decider = Decider(engine, "sidecar/authz/decision", timeout_ms=5000)
    document = merge(probe_input(), case["input"])
    try:
        decision = await decider.decide(document)
    except Refusal as refusal:
        return "policy_unavailable", refusal.extra["policy_error"], {}
    return decision.outcome, list(decision.reasons), decision.result


@pytest.fixture(params=["embedded", "rest"])
async def engine_for(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    opened: list[Any] = []

    async def factory(policy: str, data: dict[str, Any] | None = None) -> PolicyEngine:
        policy_dir = policy_with_data(ROOT / policy, data, tmp_path)
        if request.param == "embedded":
            engine: PolicyEngine = EmbeddedEngine(policy_dir)
        else:
            url = os.environ.get("OPA_URL")
            if url is None:
                server = OpaDataApiServer(policy_dir)
                await server.start()
                opened.append(server)
                url = server.url
            engine = RestEngine(url, timeout_seconds=5)
        opened.append(engine)
        return engine

    yield factory
    for item in reversed(opened):
        await (item.stop() if isinstance(item, OpaDataApiServer) else item.close())


@pytest.mark.parametrize("policy, case", cases())
async def test_decision_table(engine_for: Any, policy: str, case: dict[str, Any]) -> None:
    engine = await engine_for(policy, case.get("data"))
    outcome, detail, result = await decide(engine, case)
    assert outcome == case["outcome"]
    if outcome == "policy_unavailable":
        assert detail == case["policy_error"]
    elif "reasons" in case:
        assert detail == case["reasons"]
    for fragment in case.get("reasons_contain", []):
        assert any(fragment in reason for reason in detail), (fragment, detail)
    assert contains(result, case.get("expect", {})), (case.get("expect"), result)


async def test_both_engines_agree_on_every_case() -> None:
    """Same rego, same input, same decision document from both engines."""
    for path in VECTORS:
        table = json.loads(path.read_text())
        embedded = EmbeddedEngine(ROOT / table["policy"])
        server = OpaDataApiServer(ROOT / table["policy"])
        await server.start()
        rest = RestEngine(server.url, timeout_seconds=5)
        try:
            for case in table["cases"]:
                results = []
                for engine in (embedded, rest):
                    try:
                        results.append(await engine.evaluate("sidecar/authz/decision", merge(probe_input(), case["input"])))
                    except Exception as exc:  # noqa: BLE001 - compare failure kinds too
                        results.append(type(exc).__name__ + ":" + getattr(exc, "kind", ""))
                assert results[0] == results[1], case["name"]
        finally:
            await rest.close()
            await server.stop()
            await embedded.close()


async def test_rest_engine_behind_a_real_sidecar(make_sidecar: Any, echo_tool: Any) -> None:
    import httpx

    from harness import FIXTURE_POLICY

    server = OpaDataApiServer(FIXTURE_POLICY)
    await server.start()
    try:
        sc = await make_sidecar(engine="rest", rest_url=server.url)
        async with httpx.AsyncClient() as agent:
            allowed = await agent.get(f"{sc.proxy}/crm/customers/1")
            denied = await agent.post(f"{sc.proxy}/crm/customers", json={})
        assert allowed.status_code == 200 and denied.status_code == 403
        assert denied.json()["reasons"] == ["fixture: writes need a task"]
        assert len(echo_tool.seen) == 1
    finally:
        await server.stop()


def test_schemas_are_valid_json_schema() -> None:
    from jsonschema import Draft202012Validator

    from sidecar.policy.decide import load_schema, validator

    for name in ("input.v1", "decision.v1"):
        Draft202012Validator.check_schema(load_schema(name))
    assert list(validator("input.v1").iter_errors(probe_input())) == []


