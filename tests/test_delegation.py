"""X-Agent-Delegation: a parent agent's sidecar-minted credential, verified, recorded and nested as act."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from harness import EchoTool, RunningSidecar, sidecar_config, start_sidecar
from sidecar.delegation import DelegationVerifier
from sidecar.credentials.jwks import StaticJwks
from sidecar.credentials.keys import load_key
from sidecar.problems import Refusal
from token_vectors import Issuer, claims_for, refusal_tokens

PLANNER = "spiffe://cluster.local/ns/agents/sa/planner"
WORKER = "spiffe://cluster.local/ns/agents/sa/worker"


async def start(tmp_path: Path, name: str, echo_tool: EchoTool, **overrides: Any) -> RunningSidecar:
    folder = tmp_path / name
    folder.mkdir()
    return await start_sidecar(folder, sidecar_config(folder, echo_tool.base, **overrides))


@pytest.fixture
async def parent_and_child(tmp_path: Path, echo_tool: EchoTool) -> AsyncIterator[tuple[RunningSidecar, RunningSidecar]]:
    parent = await start(tmp_path, "parent", echo_tool, identity={"static": PLANNER},
                         credentials={"issuer": "sidecar.planner"})
    child = await start(tmp_path, "child", echo_tool, identity={"static": WORKER},
                        delegation={"jwks": f"{parent.admin}/.well-known/jwks.json", "issuers": ["sidecar.planner"],
                                    "audiences": ["crm"]})
    yield parent, child
    await child.sidecar.stop()
    await parent.sidecar.stop()


def last_token(echo_tool: EchoTool) -> str:
    [value] = echo_tool.seen[-1].headers["authorization"]
    token: str = value.removeprefix("Bearer ")
    return token


async def test_a_verified_delegation_reaches_the_policy_and_nests_in_act(
        parent_and_child: tuple[RunningSidecar, RunningSidecar], echo_tool: EchoTool) -> None:
    parent, child = parent_and_child
    async with httpx.AsyncClient() as planner:
        assert (await planner.get(parent.proxy + "/crm/customers/1")).status_code == 200
    delegation = last_token(echo_tool)  # what the planner's call to the worker carried
    async with httpx.AsyncClient() as worker:
        response = await worker.get(child.proxy + "/crm/customers/1", headers={"X-Agent-Delegation": f"Bearer {delegation}"})
    assert response.status_code == 200, response.text
    assert "x-agent-delegation" not in echo_tool.seen[-1].headers  # never forwarded upstream
    claims = jwt.decode(last_token(echo_tool), options={"verify_signature": False})
    assert claims["sub"] == WORKER and claims["act"] == {"sub": PLANNER}
    decision = [json.loads(line) for line in child.audit_path.read_text().splitlines() if '"decision"' in line][-1]
    [link] = decision["input"]["delegation"]
    parent_claims = jwt.decode(delegation, options={"verify_signature": False})
    assert link["sub"] == PLANNER and link["iss"] == "sidecar.planner" and link["jti"] == parent_claims["jti"]


async def test_every_refusal_vector_is_refused_not_ignored(
        parent_and_child: tuple[RunningSidecar, RunningSidecar], echo_tool: EchoTool) -> None:
    parent, child = parent_and_child
    # The parent's real signing key: every vector is made from the key the child trusts.
    [pem] = (parent.sidecar.config.state_dir / "dev-keys").glob("*.pem")
    key = load_key(pem)
    trusted = Issuer(key.algorithm, kid=key.kid, key=key.private_key)
    valid = claims_for(sub=PLANNER, iss="sidecar.planner", aud="crm")
    async with httpx.AsyncClient() as worker:
        control = await worker.get(child.proxy + "/crm/customers/1", headers={"X-Agent-Delegation": trusted.sign(valid)})
    assert control.status_code == 200  # the same key, unmodified, is accepted
    echo_tool.seen.clear()
    cases = refusal_tokens(trusted, valid)
    cases.append(("wrong_issuer", trusted.sign(valid | {"iss": "someone-else"}), "wrong_issuer"))
    cases.append(("garbage", "not-a-token", "malformed"))
    async with httpx.AsyncClient() as worker:
        for name, token, reason in cases:
            response = await worker.get(child.proxy + "/crm/customers/1", headers={"X-Agent-Delegation": token})
            assert response.status_code == 403, name
            problem = response.json()
            assert problem["code"] == "delegation_invalid", name
            assert token not in response.text
    assert echo_tool.seen == []


async def test_delegation_sent_to_a_sidecar_that_trusts_no_issuer_is_refused(
        tmp_path: Path, echo_tool: EchoTool) -> None:
    sc = await start(tmp_path, "lone", echo_tool)
    try:
        async with httpx.AsyncClient() as agent:
            response = await agent.get(sc.proxy + "/crm/customers/1", headers={"X-Agent-Delegation": "Bearer abc.def.ghi"})
        assert response.status_code == 403 and response.json()["code"] == "delegation_invalid"
        assert echo_tool.seen == []
    finally:
        await sc.sidecar.stop()


async def test_chains_flatten_oldest_first_and_respect_the_depth_limit() -> None:
    parent = Issuer()
    verifier = DelegationVerifier(StaticJwks(parent.jwks()), issuers=["p"], audiences=["crm"], max_depth=3)
    nested = {"sub": "agent-b", "act": {"sub": "agent-a"}}
    token = parent.sign(claims_for(sub="agent-c", iss="p", aud="crm", act=nested, jti="j-1"))
    chain = await verifier.chain(token)
    assert [link["sub"] for link in chain] == ["agent-a", "agent-b", "agent-c"]
    assert chain[-1]["jti"] == "j-1"
    deep = {"sub": "d", "act": {"sub": "c", "act": {"sub": "b", "act": {"sub": "a"}}}}
    with pytest.raises(Refusal) as refused:
        await verifier.chain(parent.sign(claims_for(sub="e", iss="p", aud="crm", act=deep)))
    assert refused.value.code == "delegation_invalid" and "deeper" in refused.value.detail
    with pytest.raises(Refusal):
        await verifier.chain(parent.sign(claims_for(sub="e", iss="p", aud="crm", act={"not": "an actor"})))
