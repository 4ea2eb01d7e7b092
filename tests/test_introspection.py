"""POST /introspect (RFC 7662) and revocation: task completion, the revoke_task obligation, restarts, replicas."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import harness
import httpx
import jwt

from harness import SidecarFactory
from harness import EchoTool, RunningSidecar, sidecar_config, start_sidecar
from sidecar.credentials import generate_key
from token_vectors import Issuer, claims_for, refusal_tokens

CALLER = "introspection-caller-token-0123456789"
INTROSPECTION = {"tokens": [CALLER]}

REVOKING_POLICY = """package sidecar.authz

import rego.v1

default decision := {"allow": false, "reasons": ["nothing matched"]}

decision := {"allow": true, "reasons": ["reads are fine"], "credential": {"audience": input.tool.route, "scopes": ["read"]}} if {
	input.request.method == "GET"
	not contains(input.request.path, "/anomaly")
}

decision := {"allow": false, "reasons": ["anomaly: bulk export"], "obligations": ["revoke_task"]} if {
	contains(input.request.path, "/anomaly")
}
"""


async def introspect(sc: RunningSidecar, token: str, caller: str | None = CALLER) -> httpx.Response:
    headers = {"Authorization": f"Bearer {caller}"} if caller else {}
    async with httpx.AsyncClient() as client:
        return await client.post(f"{sc.admin}/introspect", data={"token": token, "token_type_hint": "access_token"},
                                 headers=headers)


async def active(sc: RunningSidecar, token: str) -> bool:
    response = await introspect(sc, token)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    if not answer["active"]:
        assert answer == {"active": False}  # nothing about an inactive token is disclosed
    return bool(answer["active"])


async def open_task(sc: RunningSidecar) -> str:
    return await harness.open_task(sc.admin, "refund order 7")


async def minted(sc: RunningSidecar, echo_tool: EchoTool, task_id: str | None, path: str = "/crm/customers/1") -> str:
    headers = {"X-Agent-Task": task_id} if task_id else {}
    async with httpx.AsyncClient() as agent:
        response = await agent.get(sc.proxy + path, headers=headers)
    assert response.status_code == 200, response.text
    [value] = echo_tool.seen[-1].headers["authorization"]
    token: str = value.removeprefix("Bearer ")
    return token


async def complete(sc: RunningSidecar, task_id: str) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.post(f"{sc.admin}/v1/tasks/{task_id}/complete")


async def test_introspection_answers_rfc7662_and_says_inactive_after_task_completion(
        make_sidecar: SidecarFactory, echo_tool: EchoTool) -> None:
    sc = await make_sidecar(introspection=INTROSPECTION)
    task_id = await open_task(sc)
    token = await minted(sc, echo_tool, task_id)
    other_task = await open_task(sc)
    other = await minted(sc, echo_tool, other_task)
    response = await introspect(sc, token)
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    answer = response.json()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert answer["active"] is True and answer["token_type"] == "Bearer"
    for name in ("scope", "sub", "aud", "iss", "exp", "iat", "nbf", "jti", "task_id", "decision_id"):
        assert answer[name] == claims[name], name

    done = await complete(sc, task_id)
    assert done.status_code == 200 and done.json()["status"] == "completed"
    assert not await active(sc, token)  # at once: no polling needed
    assert await active(sc, other)  # another task's credentials are untouched
    async with httpx.AsyncClient() as agent:
        refused = await agent.get(sc.proxy + "/crm/customers/1", headers={"X-Agent-Task": task_id})
    assert refused.status_code == 400 and refused.json()["code"] == "unknown_task"
    deadline = time.monotonic() + 10  # audit events are written by a writer thread: poll, with a deadline
    while '"type":"task.completed"' not in sc.audit_path.read_text().replace(" ", ""):
        assert time.monotonic() < deadline, "no task.completed audit event"
        await _tick()


async def test_callers_must_authenticate(make_sidecar: SidecarFactory, echo_tool: EchoTool) -> None:
    sc = await make_sidecar(introspection=INTROSPECTION)
    token = await minted(sc, echo_tool, None)
    for caller in (None, "wrong-token-but-long-enough", CALLER[:-1]):
        response = await introspect(sc, token, caller)
        assert response.status_code == 401 and response.json()["code"] == "unauthorized"
        assert response.headers["www-authenticate"].startswith("Bearer")
    async with httpx.AsyncClient() as client:
        basic = await client.post(f"{sc.admin}/introspect", data={"token": token}, auth=("x", CALLER))
    assert basic.status_code == 401


async def test_no_configured_callers_means_nobody_may_introspect(sidecar: RunningSidecar, echo_tool: EchoTool) -> None:
    token = await minted(sidecar, echo_tool, None)
    response = await introspect(sidecar, token, "anything-at-all-0123456789")
    assert response.status_code == 401


async def test_callers_from_a_tokens_file_reread_when_it_changes(
        make_sidecar: SidecarFactory, echo_tool: EchoTool, tmp_path: Path) -> None:
    tokens_file = tmp_path / "introspection-tokens"
    tokens_file.write_text("first-caller-0123456789\n")
    sc = await make_sidecar(introspection={"tokens_file": str(tokens_file)})
    token = await minted(sc, echo_tool, None)
    assert (await introspect(sc, token, "first-caller-0123456789")).status_code == 200
    tokens_file.write_text("second-caller-0123456789\n")
    assert (await introspect(sc, token, "second-caller-0123456789")).status_code == 200
    assert (await introspect(sc, token, "first-caller-0123456789")).status_code == 401


async def test_unknown_foreign_expired_and_malformed_tokens_are_inactive(
        make_sidecar: SidecarFactory, echo_tool: EchoTool) -> None:
    sc = await make_sidecar(introspection=INTROSPECTION)
    token = await minted(sc, echo_tool, None)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert await active(sc, token)
    foreign = Issuer()
    valid = claims_for(sub=claims["sub"], iss=claims["iss"], aud=claims["aud"], jti=claims["jti"])
    for name, forged, _ in refusal_tokens(foreign, valid):
        assert not await active(sc, forged), name
    assert not await active(sc, foreign.sign(valid))
    assert not await active(sc, "not-a-token")
    async with httpx.AsyncClient() as client:
        missing = await client.post(f"{sc.admin}/introspect", data={}, headers={"Authorization": f"Bearer {CALLER}"})
    assert missing.status_code == 400 and missing.json()["code"] == "bad_request"


async def test_the_revoke_task_obligation_revokes_every_credential_of_the_task(
        make_sidecar: SidecarFactory, echo_tool: EchoTool, tmp_path: Path) -> None:
    policy = tmp_path / "revoking-policy"
    (policy / "sidecar" / "authz").mkdir(parents=True)
    (policy / "sidecar" / "authz" / "policy.rego").write_text(REVOKING_POLICY)
    sc = await make_sidecar(introspection=INTROSPECTION, policy_dir=policy)
    task_id = await open_task(sc)
    tokens = [await minted(sc, echo_tool, task_id, f"/crm/customers/{n}") for n in range(3)]
    assert all([await active(sc, t) for t in tokens])
    async with httpx.AsyncClient() as agent:
        refused = await agent.get(sc.proxy + "/crm/anomaly/export", headers={"X-Agent-Task": task_id})
    assert refused.status_code == 403 and refused.json()["code"] == "denied"
    assert "anomaly: bulk export" in refused.json()["reasons"]
    assert not any([await active(sc, t) for t in tokens])
    async with httpx.AsyncClient() as client:
        shown = await client.get(f"{sc.admin}/v1/tasks/{task_id}")
    assert shown.json()["status"] == "revoked"
    async with httpx.AsyncClient() as metrics:
        scrape = (await metrics.get(f"{sc.metrics}/metrics")).text
    assert 'agent_sidecar_revocations_total{cause="obligation"} 1.0' in scrape


async def test_revocation_survives_a_restart(tmp_path: Path, echo_tool: EchoTool) -> None:
    keys = tmp_path / "keys"
    generate_key(keys)
    config = sidecar_config(tmp_path, echo_tool.base, introspection=INTROSPECTION, credentials={"keys_dir": str(keys)})
    first = await start_sidecar(tmp_path, config)
    try:
        revoked_task, kept_task = await open_task(first), await open_task(first)
        revoked = await minted(first, echo_tool, revoked_task)
        kept = await minted(first, echo_tool, kept_task)
        assert (await complete(first, revoked_task)).status_code == 200
    finally:
        await first.sidecar.stop()
    second = await start_sidecar(tmp_path, config)  # same state dir, same SQLite file, new process state
    try:
        assert not await active(second, revoked)
        assert await active(second, kept)
        assert (await minted(second, echo_tool, kept_task, "/crm/after-restart")) != kept
    finally:
        await second.sidecar.stop()


async def test_two_sidecars_on_redis_share_tasks_and_the_revocation_list(
        tmp_path: Path, echo_tool: EchoTool, redis_server: Any) -> None:
    keys = tmp_path / "keys"
    generate_key(keys)
    shared = {"introspection": INTROSPECTION, "credentials": {"keys_dir": str(keys)},
              "store": {"backend": "redis", "redis_url": redis_server.url}}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = await start_sidecar(tmp_path / "a", sidecar_config(tmp_path / "a", echo_tool.base, **shared))
    b = await start_sidecar(tmp_path / "b", sidecar_config(tmp_path / "b", echo_tool.base, **shared))
    try:
        task_id = await open_task(a)
        from_a = await minted(a, echo_tool, task_id)
        from_b = await minted(b, echo_tool, task_id)  # a task opened on one replica is known to the other
        assert await active(b, from_a) and await active(a, from_b)
        assert (await complete(b, task_id)).status_code == 200
        assert not await active(a, from_a) and not await active(a, from_b)
        # Each replica records the call in the shared history after answering the agent: poll, with a deadline.
        deadline = time.monotonic() + 10
        async with httpx.AsyncClient() as client:
            while (await client.get(f"{a.admin}/v1/tasks/{task_id}")).json()["history"]["calls"] != 2:
                assert time.monotonic() < deadline, "the shared history never counted both replicas' calls"
                await _tick()
    finally:
        await a.sidecar.stop()
        await b.sidecar.stop()


async def test_an_expired_task_ends_its_credentials(make_sidecar: SidecarFactory, echo_tool: EchoTool) -> None:
    sc = await make_sidecar(introspection=INTROSPECTION)
    async with httpx.AsyncClient() as client:
        response = await client.post(f"{sc.admin}/v1/tasks", json={"intent": "short", "ttl_seconds": 2})
    task_id = response.json()["id"]
    token = await minted(sc, echo_tool, task_id)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] <= time.time() + 2  # never past the task's own expiry
    deadline = time.monotonic() + 10
    while await active(sc, token):
        assert time.monotonic() < deadline, "the credential outlived its task"
        await _tick()


async def _tick() -> None:
    import asyncio

    await asyncio.sleep(0.1)
