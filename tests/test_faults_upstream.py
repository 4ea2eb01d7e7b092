"""Upstream faults: each decision reaches the upstream at most once (a tool that resets the connection before
answering, on a pooled connection where aiohttp would silently resend an idempotent request, sees the call
once), and a tool that hangs is a 504 at the route's timeout."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness import sidecar_config, start_sidecar

sys.path.insert(0, str(Path(__file__).resolve().parent / "adversarial"))
from raw_upstream import RawUpstream  # noqa: E402

ALLOW_ALL = 'package sidecar.authz\n\ndecision := {"allow": true, "reasons": ["allow all"], "risk": "low"}\n'


@pytest.fixture
async def upstream() -> AsyncIterator[RawUpstream]:
    server = RawUpstream()
    await server.start()
    yield server
    await server.stop()


async def allow_all_sidecar(tmp_path: Path, upstream: RawUpstream, **overrides: Any) -> Any:
    policy = tmp_path / "policy" / "sidecar" / "authz"
    policy.mkdir(parents=True)
    (policy / "allow.rego").write_text(ALLOW_ALL)
    return await start_sidecar(tmp_path, sidecar_config(tmp_path, upstream.base, policy_dir=tmp_path / "policy",
                                                        **overrides))


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "POST", "PATCH"])
async def test_a_reset_before_the_answer_never_resends_the_call(tmp_path: Path, upstream: RawUpstream,
                                                                 method: str) -> None:
    running = await allow_all_sidecar(tmp_path, upstream)
    try:
        async with httpx.AsyncClient() as agent:
            warm = await agent.request(method, f"{running.proxy}/crm/warm")  # leaves a pooled connection behind
            assert warm.status_code == 200
            upstream.reset_before_answer = True
            refused = await agent.request(method, f"{running.proxy}/crm/records/7", content=b"{}" if method in (
                "PUT", "POST", "PATCH") else None)
        assert refused.status_code == 502
        if method != "HEAD":
            assert refused.json()["code"] == "upstream_error"
        calls = [r for r in upstream.received if r.target.endswith("/records/7")]
        assert len(calls) == 1, [r.request_line for r in calls]
        [decision] = calls[0].header("X-Agent-Decision")
        assert [r for r in upstream.received if r.header("X-Agent-Decision") == [decision]] == calls
    finally:
        await running.sidecar.stop()


async def test_a_tool_that_hangs_is_a_504_at_the_routes_timeout_and_the_chain_says_so(
        tmp_path: Path, upstream: RawUpstream) -> None:
    import asyncio
    import json

    upstream.hold = asyncio.Event()  # never set while the call waits: the tool hangs
    routes = [{"name": "crm", "match": {"path_prefix": "/crm"}, "upstream": f"{upstream.base}/crm", "timeout_seconds": 0.5}]
    running = await allow_all_sidecar(tmp_path, upstream, routes=routes)
    try:
        async with httpx.AsyncClient() as agent:
            response = await agent.get(f"{running.proxy}/crm/slow")
        assert response.status_code == 504 and response.json()["code"] == "upstream_timeout"
        decision_id = response.json()["decision_id"]
        [call] = [r for r in upstream.received if r.target == "/crm/slow"]
        assert call.header("X-Agent-Decision") == [decision_id]
        events = [json.loads(line) for line in running.audit_path.read_text().splitlines()]
        outcomes = [(e["type"], e.get("outcome")) for e in events if e.get("decision_id") == decision_id]
        assert ("decision", "allow") in outcomes
    finally:
        upstream.hold.set()
        await running.sidecar.stop()
