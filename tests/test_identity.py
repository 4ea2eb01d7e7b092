"""Workload identity from a watched token file (Kubernetes projected SA token, SPIFFE JWT-SVID)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from aiohttp import web

from harness import SidecarFactory
from harness import EchoTool, RunningSidecar, free_port, serve_app
from sidecar.credentials.jwks import FileJwks, UrlJwks
from sidecar.identity import TokenFileIdentity
from sidecar.problems import Refusal
from token_vectors import Issuer, claims_for, refusal_tokens

K8S_ISSUER = "https://kubernetes.default.svc.cluster.local"
AUDIENCE = "agent-sidecar"
SPIFFE_ID = "spiffe://cluster.local/ns/agents/sa/billing-agent"


def write(path: Path, text: str) -> None:
    """Atomic replace, as the kubelet does for projected volumes."""
    staging = path.with_suffix(".tmp")
    staging.write_text(text)
    staging.replace(path)


def sa_token(issuer: Issuer, sub: str = SPIFFE_ID, ttl: int = 600, **extra: Any) -> str:
    return issuer.sign(claims_for(sub=sub, iss=K8S_ISSUER, aud=AUDIENCE, ttl=ttl, **extra))


@pytest.fixture
def cluster(tmp_path: Path) -> tuple[Issuer, Path, Path]:
    issuer = Issuer("RS256")
    jwks = tmp_path / "cluster-jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    token = tmp_path / "token"
    write(token, sa_token(issuer))
    return issuer, jwks, token


def identity_config(jwks: Path | str, token: Path) -> dict[str, Any]:
    return {"token_file": str(token), "jwks": str(jwks), "audience": AUDIENCE, "issuer": K8S_ISSUER}


async def readiness(sc: RunningSidecar) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        document: dict[str, Any] = (await client.get(f"{sc.metrics}/readyz")).json()
    return document


async def until(condition: Any, what: str, deadline_seconds: float = 15.0) -> None:
    deadline = time.monotonic() + deadline_seconds
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_the_verified_sub_is_the_agent_and_every_credentials_sub(
        make_sidecar: SidecarFactory, echo_tool: EchoTool, cluster: tuple[Issuer, Path, Path]) -> None:
    issuer, jwks, token = cluster
    sc = await make_sidecar(identity=identity_config(jwks, token))
    ready = await readiness(sc)
    assert ready["checks"]["identity"]["ok"] and SPIFFE_ID in ready["checks"]["identity"]["detail"]
    async with httpx.AsyncClient() as agent:
        assert (await agent.get(sc.proxy + "/crm/customers/1")).status_code == 200
    [value] = echo_tool.seen[-1].headers["authorization"]
    assert jwt.decode(value[7:], options={"verify_signature": False})["sub"] == SPIFFE_ID
    decision = [json.loads(line) for line in sc.audit_path.read_text().splitlines() if '"decision"' in line][-1]
    assert decision["input"]["agent"] == {"id": SPIFFE_ID, "verified": True}

    write(token, sa_token(issuer, sub="spiffe://cluster.local/ns/agents/sa/other-agent"))

    async def rotated() -> bool:
        async with httpx.AsyncClient() as agent:
            assert (await agent.get(sc.proxy + "/crm/customers/1")).status_code == 200
        [value] = echo_tool.seen[-1].headers["authorization"]
        return bool(jwt.decode(value[7:], options={"verify_signature": False})["sub"].endswith("/other-agent"))

    await until(rotated, "the re-projected token to take over")


async def test_an_expired_token_turns_readiness_red_and_every_call_fails_closed(
        make_sidecar: SidecarFactory, echo_tool: EchoTool, cluster: tuple[Issuer, Path, Path]) -> None:
    issuer, jwks, token = cluster
    sc = await make_sidecar(identity=identity_config(jwks, token))
    assert (await readiness(sc))["ready"] is True
    write(token, issuer.sign(claims_for(sub=SPIFFE_ID, iss=K8S_ISSUER, aud=AUDIENCE, ttl=-300)))

    async def red() -> bool:
        return not (await readiness(sc))["checks"]["identity"]["ok"]

    await until(red, "readiness to turn red")
    ready = await readiness(sc)
    assert ready["ready"] is False and "identity" in ready["failing"] and "expired" in ready["checks"]["identity"]["detail"]
    async with httpx.AsyncClient() as agent:
        refused = await agent.get(sc.proxy + "/crm/customers/1")
        task = await agent.post(f"{sc.admin}/v1/tasks", json={"intent": "x"})
    assert refused.status_code == 503 and refused.json()["code"] == "identity_unavailable"
    assert task.status_code == 503
    assert echo_tool.seen == []

    write(token, sa_token(issuer))  # the kubelet projects a fresh one: service resumes
    await until(lambda: _ready(sc), "readiness to turn green again")


async def _ready(sc: RunningSidecar) -> bool:
    return bool((await readiness(sc))["ready"])


async def test_a_missing_token_file_fails_closed_from_the_start(
        make_sidecar: SidecarFactory, echo_tool: EchoTool, cluster: tuple[Issuer, Path, Path], tmp_path: Path) -> None:
    _, jwks, _ = cluster
    sc = await make_sidecar(identity=identity_config(jwks, tmp_path / "not-projected-yet"))
    ready = await readiness(sc)
    assert not ready["ready"] and "cannot read" in ready["checks"]["identity"]["detail"]
    async with httpx.AsyncClient() as agent:
        refused = await agent.get(sc.proxy + "/crm/customers/1")
    assert refused.status_code == 503 and refused.json()["code"] == "identity_unavailable"


async def test_every_refusal_vector_leaves_the_sidecar_without_an_identity(cluster: tuple[Issuer, Path, Path]) -> None:
    issuer, jwks, token = cluster
    identity = TokenFileIdentity(token, FileJwks(jwks), audience=AUDIENCE, issuer=K8S_ISSUER)
    await identity.refresh()
    assert identity.current().id == SPIFFE_ID and identity.current().verified
    valid = claims_for(sub=SPIFFE_ID, iss=K8S_ISSUER, aud=AUDIENCE)
    for name, bad, reason in refusal_tokens(issuer, valid):
        write(token, bad)
        await identity.refresh()
        with pytest.raises(Refusal) as refused:
            identity.current()
        assert refused.value.code == "identity_unavailable", name
        assert reason in refused.value.detail, name
        assert bad not in refused.value.detail
        ok, detail = await identity.ready()
        assert not ok and reason in detail
    write(token, issuer.sign(claims_for(sub=SPIFFE_ID, iss="https://evil.example", aud=AUDIENCE)))
    await identity.refresh()
    with pytest.raises(Refusal):
        identity.current()


@pytest.fixture
async def jwks_server() -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """A JWKS URL, as a SPIRE OIDC discovery provider would serve it; the test changes ``served`` to rotate."""
    served: dict[str, Any] = {"keys": []}

    async def handle(request: web.Request) -> web.Response:
        return web.json_response(served)

    app = web.Application()
    app.router.add_get("/keys", handle)
    runner, port = await serve_app(app)
    yield f"http://127.0.0.1:{port}/keys", served
    await runner.cleanup()


async def test_a_jwks_url_is_fetched_and_refetched_for_a_new_kid(
        jwks_server: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    url, served = jwks_server
    old, new = Issuer("ES256"), Issuer("ES256")
    served["keys"] = old.jwks()["keys"]
    token = tmp_path / "svid"
    write(token, sa_token(old))
    identity = TokenFileIdentity(token, UrlJwks(url, min_refresh=0.0), audience=AUDIENCE, issuer=K8S_ISSUER)
    await identity.refresh()
    assert identity.current().id == SPIFFE_ID
    served["keys"] = old.jwks()["keys"] + new.jwks()["keys"]
    write(token, sa_token(new, sub="spiffe://cluster.local/ns/agents/sa/rotated"))
    await identity.refresh()
    assert identity.current().id.endswith("/rotated")


async def test_an_unreachable_jwks_url_is_unavailable_not_trusted(tmp_path: Path) -> None:
    token = tmp_path / "svid"
    write(token, sa_token(Issuer()))
    identity = TokenFileIdentity(token, UrlJwks(f"http://127.0.0.1:{free_port()}/keys"), audience=AUDIENCE)
    await identity.refresh()
    ok, detail = await identity.ready()
    assert not ok and "keys_unavailable" in detail
