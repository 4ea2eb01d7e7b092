"""Credentials: verify_jwt against the refusal vectors, minting checked by jwcrypto over real sockets, rotation."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from jwcrypto import jwk as jose_jwk
from jwcrypto import jwt as jose_jwt

from harness import SidecarFactory
from harness import EchoTool, RunningSidecar, sidecar_config
from sidecar.app import build_sidecar
from sidecar.config import ConfigError, parse_config
from sidecar.credentials import generate_key
from sidecar.credentials.minter import request_binding
from sidecar.credentials.verify import WORKLOAD_ALGORITHMS, TokenError, verify_jwt
from token_vectors import Issuer, claims_for, refusal_tokens

@pytest.mark.parametrize("algorithm", ["ES256", "EdDSA", "RS256"])
def test_a_valid_token_verifies_and_every_vector_is_refused(algorithm: str) -> None:
    issuer = Issuer(algorithm)
    valid = claims_for(sub="spiffe://test/agent", iss="https://issuer.test", aud="agent-sidecar")
    claims = verify_jwt(issuer.sign(valid), issuer.jwks(), issuer="https://issuer.test", audience="agent-sidecar",
                        algorithms=WORKLOAD_ALGORITHMS)
    assert claims["sub"] == "spiffe://test/agent"
    for name, token, reason in refusal_tokens(issuer, valid):
        with pytest.raises(TokenError) as refused:
            verify_jwt(token, issuer.jwks(), issuer="https://issuer.test", audience="agent-sidecar",
                       algorithms=WORKLOAD_ALGORITHMS)
        assert refused.value.reason == reason, name
        assert token not in str(refused.value)


def test_wrong_issuer_and_algorithm_not_in_the_callers_list() -> None:
    issuer = Issuer("RS256")
    token = issuer.sign(claims_for(sub="a", iss="https://other", aud="x"))
    with pytest.raises(TokenError) as refused:
        verify_jwt(token, issuer.jwks(), issuer="https://issuer.test", audience="x", algorithms=WORKLOAD_ALGORITHMS)
    assert refused.value.reason == "wrong_issuer"
    with pytest.raises(TokenError) as refused:
        verify_jwt(token, issuer.jwks(), issuer=None, audience="x", algorithms=("ES256",))
    assert refused.value.reason == "algorithm_not_allowed"


def test_a_key_of_the_wrong_type_for_the_algorithm_is_refused() -> None:
    ec_issuer = Issuer("ES256")
    ed_issuer = Issuer("EdDSA", kid=ec_issuer.kid)
    token = ed_issuer.sign(claims_for(sub="a", iss="i", aud="x"))
    with pytest.raises(TokenError) as refused:
        verify_jwt(token, ec_issuer.jwks(), issuer="i", audience="x")
    assert refused.value.reason == "wrong_key_type"


def test_missing_exp_and_garbage_are_refused() -> None:
    issuer = Issuer()
    claims = claims_for(sub="a", iss="i", aud="x")
    del claims["exp"]
    with pytest.raises(TokenError) as refused:
        verify_jwt(issuer.sign(claims), issuer.jwks(), issuer="i", audience="x")
    assert refused.value.reason == "missing_claim"
    for garbage in ("", "a.b", "not-a-jwt", "x" * 20000):
        with pytest.raises(TokenError):
            verify_jwt(garbage, issuer.jwks(), issuer="i", audience="x")

# ---------------------------------------------------------------- minting, JWKS and rotation, over real sockets

async def fetch_jwks(sc: RunningSidecar) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{sc.admin}/.well-known/jwks.json")
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


def tool_side_verify(token: str, jwks: dict[str, Any], audience: str) -> dict[str, Any]:
    """What a tool does with an independent JOSE library (jwcrypto): signature, iss, aud, exp, nbf."""
    keyset = jose_jwk.JWKSet.from_json(json.dumps(jwks))
    checked = jose_jwt.JWT(jwt=token, key=keyset, algs=["ES256", "EdDSA"],
                           check_claims={"iss": "agent-sidecar", "aud": audience, "exp": None, "nbf": None})
    claims: dict[str, Any] = json.loads(checked.claims)
    return claims


async def open_task(sc: RunningSidecar, ttl: int = 600) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        response = await client.post(f"{sc.admin}/v1/tasks", json={"intent": "refund order 7", "ttl_seconds": ttl})
    assert response.status_code == 201, response.text
    task: dict[str, Any] = response.json()
    return task


def bearer(seen: Any) -> str:
    [value] = seen.headers["authorization"]
    token: str = value.removeprefix("Bearer ")
    return token


@pytest.mark.parametrize("algorithm", ["ES256", "EdDSA"])
async def test_every_minted_token_verifies_with_jwcrypto_against_the_served_jwks(
        make_sidecar: SidecarFactory, echo_tool: EchoTool, algorithm: str) -> None:
    sc = await make_sidecar(credentials={"algorithm": algorithm, "max_ttl_seconds": 120})
    task = await open_task(sc, ttl=20)  # shorter than the policy's 60 s: the task caps exp
    async with httpx.AsyncClient() as agent:
        for path in ("/crm/customers/1?x=1", "/payments/balance", "/crm/customers/2"):
            assert (await agent.get(sc.proxy + path, headers={"X-Agent-Task": task["id"]})).status_code == 200
        assert (await agent.post(sc.proxy + "/crm/notes", json={"text": "hi"},
                                 headers={"X-Agent-Task": task["id"]})).status_code == 200
    jwks = await fetch_jwks(sc)
    assert [k["alg"] for k in jwks["keys"]] == [algorithm]
    jtis = set()
    for seen in echo_tool.seen:
        token = bearer(seen)
        claims = tool_side_verify(token, jwks, seen.path.split("/")[1])
        assert claims["sub"] == "spiffe://test/ns/agents/sa/agent-under-test"
        assert claims["task_id"] == task["id"] and claims["decision_id"] == seen.headers["x-agent-decision"][0]
        assert len(claims["jti"]) == 32 and claims["jti"] not in jtis
        jtis.add(claims["jti"])
        assert claims["nbf"] <= claims["iat"] + 1 and claims["exp"] - claims["iat"] <= 20
        req = claims["req"]
        assert req["method"] == seen.method and req["uri"].endswith(seen.path + (f"?{seen.query}" if seen.query else ""))
        assert req["body_sha256"] == hashlib.sha256(seen.body).hexdigest()
        assert claims["req_hash"] == request_binding(req["method"], req["uri"], req["body_sha256"])
    assert len(jtis) == 4
    audit = sc.audit_path.read_text()
    for seen in echo_tool.seen:
        assert bearer(seen) not in audit  # the jti is logged, never the credential
        assert tool_side_verify(bearer(seen), jwks, seen.path.split("/")[1])["jti"] in audit


async def test_exp_is_capped_by_the_configured_maximum(make_sidecar: SidecarFactory, echo_tool: EchoTool) -> None:
    sc = await make_sidecar(credentials={"max_ttl_seconds": 30})
    async with httpx.AsyncClient() as agent:
        assert (await agent.get(sc.proxy + "/crm/customers/1")).status_code == 200  # the policy asks for 60 s
    claims = tool_side_verify(bearer(echo_tool.seen[0]), await fetch_jwks(sc), "crm")
    assert claims["exp"] - claims["iat"] == 30


async def _poll(condition: Any, what: str, deadline_seconds: float = 15.0) -> Any:
    deadline = time.monotonic() + deadline_seconds
    while time.monotonic() < deadline:
        value = await condition()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_new_key_file_rotates_signing_without_a_restart(
        make_sidecar: SidecarFactory, echo_tool: EchoTool, tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    first = generate_key(keys_dir)
    sc = await make_sidecar(credentials={"keys_dir": str(keys_dir), "reload_seconds": 0.1})
    async with httpx.AsyncClient() as agent:
        assert (await agent.get(sc.proxy + "/crm/a")).status_code == 200
    assert jwt.get_unverified_header(bearer(echo_tool.seen[-1]))["kid"] == first.kid

    second = generate_key(keys_dir, "EdDSA")
    await _poll(lambda: _jwks_has(sc, {first.kid, second.kid}), "the JWKS to serve both keys")

    async def next_kid_is_new() -> bool:
        async with httpx.AsyncClient() as agent:
            assert (await agent.get(sc.proxy + "/crm/b")).status_code == 200
        return bool(jwt.get_unverified_header(bearer(echo_tool.seen[-1]))["kid"] == second.kid)

    await _poll(next_kid_is_new, "the new key to sign")
    tool_side_verify(bearer(echo_tool.seen[-1]), await fetch_jwks(sc), "crm")

    first.path.unlink()  # retiring the old key: its public half leaves the JWKS
    await _poll(lambda: _jwks_has(sc, {second.kid}), "the JWKS to drop the removed key")


async def _jwks_has(sc: RunningSidecar, kids: set[str]) -> bool:
    return {k["kid"] for k in (await fetch_jwks(sc))["keys"]} == kids


def test_a_missing_key_directory_is_a_start_up_error_naming_the_path(tmp_path: Path) -> None:
    echo_tool_base = "http://127.0.0.1:9"
    missing = tmp_path / "no-such-keys"
    config = sidecar_config(tmp_path, echo_tool_base, credentials={"keys_dir": str(missing)})
    with pytest.raises(ConfigError) as failed:
        build_sidecar(parse_config(config, tmp_path / "sidecar.yaml"))
    assert "credentials.keys_dir" in str(failed.value) and str(missing) in str(failed.value)
    empty = tmp_path / "empty-keys"
    empty.mkdir()
    config = sidecar_config(tmp_path, echo_tool_base, credentials={"keys_dir": str(empty)})
    with pytest.raises(ConfigError) as failed:
        build_sidecar(parse_config(config, tmp_path / "sidecar.yaml"))
    assert str(empty) in str(failed.value)


async def test_a_static_key_is_injected_reread_on_change_and_never_shown(
        make_sidecar: SidecarFactory, echo_tool: EchoTool, tmp_path: Path) -> None:
    key_file = tmp_path / "legacy.key"
    key_file.write_text("sk-live-first-0123456789\n")
    routes = sidecar_config(tmp_path, echo_tool.base)["routes"]
    routes.append({"name": "legacy", "match": {"path_prefix": "/legacy"}, "upstream": f"{echo_tool.base}/legacy",
                   "credential": {"mode": "static", "header": "X-Api-Key", "static_key_file": str(key_file)}})
    sc = await make_sidecar(routes=routes)
    async with httpx.AsyncClient() as agent:
        first = await agent.get(sc.proxy + "/legacy/items", headers={"X-Api-Key": "agent-guess"})
        assert first.status_code == 200 and "sk-live" not in first.text
        key_file.write_text("sk-live-second-9876543210\n")
        os.utime(key_file, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
        assert (await agent.get(sc.proxy + "/legacy/items")).status_code == 200
    assert [s.headers["x-api-key"] for s in echo_tool.seen] == [["sk-live-first-0123456789"], ["sk-live-second-9876543210"]]
    assert "sk-live" not in sc.audit_path.read_text()


@pytest.mark.parametrize("section, value, message", [
    ("identity", {"token_file": "/t"}, "sidecar.yaml: identity.jwks: is required with token_file"),
    ("identity", {"token_file": "/t", "jwks": "/j"}, "sidecar.yaml: identity.audience: is required with token_file"),
    ("store", {"backend": "redis"}, "sidecar.yaml: store.redis_url: is required when backend is redis"),
    ("store", {"redis_url": "http://x"}, "sidecar.yaml: store.redis_url: must be a redis://"),
    ("introspection", {"tokens": ["short"]}, "sidecar.yaml: introspection.tokens: each token needs at least 16"),
    ("introspection", {"tokens_file": "/nope"}, "sidecar.yaml: introspection.tokens_file: no such file"),
    ("delegation", {"jwks": "http://p/jwks"}, "sidecar.yaml: delegation.issuers: is required with jwks"),
    ("delegation", {"jwks": "/nope.json", "issuers": ["p"], "audiences": ["a"]}, "sidecar.yaml: delegation.jwks: no such file"),
    ("credentials", {"reload_seconds": 0}, "sidecar.yaml: credentials.reload_seconds: must be between"),
])
def test_config_errors_name_the_file_and_key(tmp_path: Path, section: str, value: Any, message: str) -> None:
    config = sidecar_config(tmp_path, "http://127.0.0.1:9", **{section: value})
    with pytest.raises(ConfigError) as failed:
        parse_config(config, tmp_path / "sidecar.yaml")
    assert str(failed.value).startswith(message), str(failed.value)
