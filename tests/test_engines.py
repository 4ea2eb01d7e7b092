"""One table of decision cases through both engines: embedded OPA and the OPA REST Data API client.

The REST side runs over a real socket against OpaDataApiServer (tests/harness.py), which speaks
OPA's Data API on top of the embedded engine, because no `opa` binary can be installed here.
Set OPA_URL=http://127.0.0.1:8181 to run the REST side against a real `opa run --server` instead.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from harness import FIXTURE_POLICY, ROOT, OpaDataApiServer, sidecar_config
from sidecar.app import build_sidecar, probe_input
from sidecar.config import ConfigError, load_config
from sidecar.policy import Decider, PolicyEngine
from sidecar.policy.embedded import EmbeddedEngine
from sidecar.policy.loader import PolicyLoadError
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

    for name in ("input.v1", "input.v2", "decision.v1"):
        Draft202012Validator.check_schema(load_schema(name))
    assert list(validator("input.v2").iter_errors(probe_input())) == []




# -- the library's data check, run once at load by the embedded engine ----------------------------

def library_with_data(tmp_path: Path, data: dict[str, Any]) -> Path:
    return policy_with_data(ROOT / "rego", data, tmp_path)


def test_embedded_engine_refuses_a_mistyped_knob_at_load_naming_it(tmp_path: Path) -> None:
    policy = library_with_data(tmp_path, {"sidecar": {"config": {"limits": {"per_call_amount": "50"}}}})
    with pytest.raises(PolicyLoadError) as caught:
        EmbeddedEngine(policy)
    assert "limits.per_call_amount must be a number" in str(caught.value)
    assert str(policy / "data.json") in str(caught.value)


def test_a_rate_cap_the_history_cannot_reach_is_refused_at_load(tmp_path: Path) -> None:
    """attack8: past 20 (the allowed calls' times the history carries) the rate rule was off without a word."""
    policy = library_with_data(tmp_path, {"sidecar": {"config": {"anomalies": {"max_calls_in_window": 21}}}})
    with pytest.raises(PolicyLoadError) as caught:
        EmbeddedEngine(policy)
    assert "anomalies.max_calls_in_window must be at most 20" in str(caught.value)


def test_sidecar_start_names_the_knob_and_the_setting(tmp_path: Path) -> None:
    policy = library_with_data(tmp_path, {"sidecar": {"config": {"read_methods": "GET"}}})
    config_file = tmp_path / "sidecar.yaml"
    config_file.write_text(json.dumps(sidecar_config(tmp_path, "http://127.0.0.1:9", policy_dir=policy)))
    with pytest.raises(ConfigError) as caught:
        build_sidecar(load_config(config_file))
    assert "policy.rego_dir" in str(caught.value) and "read_methods must be a array" in str(caught.value)


def test_a_data_file_cannot_claim_the_check_was_done(tmp_path: Path) -> None:
    policy = library_with_data(tmp_path, {"sidecar": {"runtime": {"config_checked": True},
                                                      "config": {"limits": {"per_call_amount": "50"}}}})
    with pytest.raises(PolicyLoadError) as caught:
        EmbeddedEngine(policy)
    assert "data.sidecar.runtime is set by the sidecar" in str(caught.value)
    (policy / "sidecar" / "runtime").mkdir(parents=True, exist_ok=True)
    (policy / "sidecar" / "runtime" / "data.json").write_text('{"config_checked": true}')
    (policy / "data.json").write_text((ROOT / "rego" / "data.json").read_text())
    with pytest.raises(PolicyLoadError):
        EmbeddedEngine(policy)


async def test_a_checked_library_skips_the_per_call_check_and_still_decides(tmp_path: Path) -> None:
    engine = EmbeddedEngine(ROOT / "rego")
    try:
        assert await engine.evaluate("sidecar/authz/data_checked_at_load", {}) is True
        decision = await engine.evaluate("sidecar/authz/decision", probe_input())
        assert "config_invalid" not in decision["rules"]
    finally:
        await engine.close()


# -- shedding: a call that would wait in the engine's queue past the deadline -------------------


async def _two_at_once(engine: EmbeddedEngine, *, one_alone_first: bool = True) -> list[Any]:
    decider = Decider(engine, "sidecar/authz/decision", timeout_ms=5000)
    try:
        if one_alone_first:
            await decider.decide(probe_input())  # nothing ahead of it; it times an evaluation
        return list(await asyncio.gather(decider.decide(probe_input()), decider.decide(probe_input()),
                                         return_exceptions=True))
    finally:
        await engine.close()


async def test_a_call_behind_a_queue_longer_than_the_deadline_is_refused_at_once_as_overloaded() -> None:
    """Any evaluation ahead outlasts a deadline of one nanosecond: the second of two calls is shed
    before it is queued, as `overloaded` (503, Retry-After), not as a policy failure."""
    first, second = await _two_at_once(EmbeddedEngine(FIXTURE_POLICY, queue_deadline_seconds=1e-9))
    assert not isinstance(first, BaseException) and first.outcome in {"allow", "hold", "deny"}
    assert isinstance(second, Refusal) and second.code == "overloaded"
    assert second.headers == {"Retry-After": "1"} and "policy_error" not in second.extra


async def test_without_a_deadline_every_call_waits_its_turn() -> None:
    results = await _two_at_once(EmbeddedEngine(FIXTURE_POLICY))
    assert not any(isinstance(result, BaseException) for result in results)


async def test_nothing_is_shed_before_an_evaluation_has_been_timed() -> None:
    results = await _two_at_once(EmbeddedEngine(FIXTURE_POLICY, queue_deadline_seconds=1e-9), one_alone_first=False)
    assert not any(isinstance(result, BaseException) for result in results)


# -- one compiled engine, several evaluation threads ----------------------------------------------


async def test_threads_evaluating_at_once_on_the_pools_one_engine_each_get_their_own_answer() -> None:
    """The pool's threads share one compiled policy and evaluate on it at once (no lock around the
    evaluation): every case of the shipped library's table, three at a time, many times over, gets
    the answer it gets alone."""
    inputs = [merge(probe_input(), case.values[1]["input"]) for case in cases() if case.values[0] == "rego"]
    engine = EmbeddedEngine(ROOT / "rego", workers=3, spare_engines=1)
    try:
        alone = [json.dumps(engine.evaluate_sync("sidecar/authz/decision", document), sort_keys=True)
                 for document in inputs]
        assert len(set(alone)) > 3  # the cases differ, so a swapped answer would show
        together = await asyncio.gather(*(engine.evaluate("sidecar/authz/decision", document)
                                          for _ in range(6) for document in inputs))
        assert [json.dumps(answer, sort_keys=True) for answer in together] == alone * 6
    finally:
        await engine.close()
