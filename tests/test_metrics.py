"""Metrics, health and readiness on their own listener, scraped over a real socket and linted by promtool."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess

import httpx
import pytest

from harness import SidecarFactory
from harness import RunningSidecar
from sidecar.observability.health import READINESS

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

EXPECTED = [
    "agent_sidecar_requests_total",
    "agent_sidecar_refusals_total",
    "agent_sidecar_decision_duration_seconds_bucket",
    "agent_sidecar_upstream_duration_seconds_bucket",
    "agent_sidecar_policy_errors_total",
    "agent_sidecar_credentials_minted_total",
    "agent_sidecar_revocations_total",
    "agent_sidecar_approvals_pending",
    "agent_sidecar_approvals_resolved_total",
    "agent_sidecar_audit_write_errors_total",
    "agent_sidecar_audit_events_total",
    "agent_sidecar_audit_queue_events",
    "agent_sidecar_audit_queue_bytes",
]


async def drive_traffic(sc: RunningSidecar) -> str:
    """An allowed, a denied, a held, a malformed-decision and an unroutable call; returns the task id."""
    async with httpx.AsyncClient() as client:
        task = (await client.post(f"{sc.admin}/v1/tasks", json={"intent": "metrics test", "ttl_seconds": 60})).json()["id"]
        assert (await client.get(f"{sc.proxy}/crm/customers/42", headers={"X-Agent-Task": task})).status_code == 200
        assert (await client.get(f"{sc.proxy}/crm/customers/43")).status_code == 200
        assert (await client.post(f"{sc.proxy}/crm/customers", json={"n": 1})).status_code == 403
        held = await client.delete(f"{sc.proxy}/crm/customers/42", headers={"X-Agent-Task": task})
        assert held.json()["code"] == "approval_required"
        assert (await client.get(f"{sc.proxy}/crm/fault/malformed")).json()["code"] == "policy_unavailable"
        assert (await client.get(f"{sc.proxy}/nowhere/at/all")).json()["code"] == "no_route"
    return str(task)


async def scrape(sc: RunningSidecar) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.get(f"{sc.metrics}/metrics")


def value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no series {series}")


async def test_metrics_after_real_calls_pass_promtool(sidecar: RunningSidecar) -> None:
    task = await drive_traffic(sidecar)
    response = await scrape(sidecar)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text

    lint = await asyncio.to_thread(subprocess.run, [PROMTOOL, "check", "metrics"], input=text, capture_output=True,
                                   text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert lint.stdout.strip() == "" and lint.stderr.strip() == "", lint.stdout + lint.stderr  # no lint warnings

    for name in EXPECTED:
        assert re.search(rf"^{name}[{{ ]", text, re.M), f"{name} missing"
    assert value(text, 'agent_sidecar_requests_total{outcome="allowed",route="crm"}') == 2
    assert value(text, 'agent_sidecar_requests_total{outcome="denied",route="crm"}') == 1
    assert value(text, 'agent_sidecar_requests_total{outcome="approval_required",route="crm"}') == 1
    assert value(text, 'agent_sidecar_requests_total{outcome="error",route="crm"}') == 1
    assert value(text, 'agent_sidecar_requests_total{outcome="refused",route="none"}') == 1
    assert value(text, 'agent_sidecar_refusals_total{code="no_route"}') == 1
    assert value(text, 'agent_sidecar_policy_errors_total{engine="embedded",kind="malformed"}') == 1
    assert value(text, 'agent_sidecar_credentials_minted_total{route="crm"}') == 2
    assert value(text, 'agent_sidecar_decision_duration_seconds_count{engine="embedded"}') >= 4
    assert value(text, 'agent_sidecar_upstream_duration_seconds_count{route="crm"}') == 2
    # Series exist at zero before their first event, so rates and alerts work from the start.
    assert value(text, 'agent_sidecar_requests_total{outcome="allowed",route="payments"}') == 0
    assert value(text, 'agent_sidecar_policy_errors_total{engine="embedded",kind="timeout"}') == 0
    # Sub-millisecond resolution for decisions.
    assert 'agent_sidecar_decision_duration_seconds_bucket{engine="embedded",le="0.0001"}' in text

    # No label carries an unbounded value: no task ids, decision ids, paths or hosts.
    labels = re.findall(r'(\w+)="([^"]*)"', text)
    values = {v for _, v in labels}
    assert task not in text
    assert not any("/" in v or v.startswith(("t-", "ap-")) for v in values), values
    # bundle/revision: agent_sidecar_policy_info has one series, the policy deciding now (issue 19).
    assert {k for k, _ in labels} <= {"route", "outcome", "code", "engine", "kind", "cause", "record", "le",
                                      "result", "bundle", "revision"}


async def test_healthz_and_readyz_name_their_checks(sidecar: RunningSidecar) -> None:
    async with httpx.AsyncClient() as client:
        alive = await client.get(f"{sidecar.metrics}/healthz")
        assert alive.status_code == 200 and alive.json() == {"status": "alive"}
        ready = await client.get(f"{sidecar.metrics}/readyz")
        assert ready.status_code == 200, ready.text
        body = ready.json()
        assert body["ready"] is True and body["failing"] == []
        assert {"policy", "audit"} <= set(body["checks"])
        assert "engine answered" in body["checks"]["policy"]["detail"]


async def test_a_registered_check_that_fails_turns_readyz_red_and_is_named(sidecar: RunningSidecar) -> None:
    async def red() -> tuple[bool, str]:
        return False, "the test says no"

    async def boom() -> tuple[bool, str]:
        raise ConnectionError("secret-looking detail that must not leak")

    readiness = sidecar.sidecar.metrics_app[READINESS]
    readiness.register("example", red)
    readiness.register("crashing", boom)
    with pytest.raises(ValueError):
        readiness.register("example", red)
    async with httpx.AsyncClient() as client:
        ready = await client.get(f"{sidecar.metrics}/readyz")
    assert ready.status_code == 503
    body = ready.json()
    assert body["ready"] is False and sorted(body["failing"]) == ["crashing", "example"]
    assert body["checks"]["example"] == {"ok": False, "detail": "the test says no"}
    assert body["checks"]["crashing"]["detail"] == "check failed (ConnectionError)"
    assert body["checks"]["policy"]["ok"] is True


async def test_a_check_that_hangs_is_red_not_a_hung_probe(sidecar: RunningSidecar) -> None:
    never = asyncio.Event()

    async def hangs() -> tuple[bool, str]:
        await never.wait()
        return True, "unreachable"

    readiness = sidecar.sidecar.metrics_app[READINESS]
    readiness.timeout_seconds = 0.2
    readiness.register("hangs", hangs)
    async with httpx.AsyncClient() as client:
        ready = await client.get(f"{sidecar.metrics}/readyz")
    assert ready.status_code == 503 and ready.json()["failing"] == ["hangs"]
    assert "no answer within" in ready.json()["checks"]["hangs"]["detail"]


async def test_readyz_is_red_when_the_policy_engine_cannot_answer(make_sidecar: SidecarFactory, tmp_path: object) -> None:
    sc = await make_sidecar(engine="rest", rest_url="http://127.0.0.1:9")  # nothing listens on the discard port
    async with httpx.AsyncClient() as client:
        ready = await client.get(f"{sc.metrics}/readyz")
    assert ready.status_code == 503 and "policy" in ready.json()["failing"]
