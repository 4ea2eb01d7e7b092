"""Human approval on one sidecar (SQLite store): hold, retry, approve, deny, who may approve, wait, audit, metrics."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from approvals_support import (AGENT, APPROVAL_POLICY, ApproverIdP, approve, audit_event, audit_events, eventually,
                               list_pending, open_task)
from harness import SidecarFactory
from harness import EchoTool, RunningSidecar

ALICE = "alice@example.com"
BOB = "bob@example.com"


@pytest.fixture
def idp(tmp_path: Path) -> ApproverIdP:
    return ApproverIdP(tmp_path)


@pytest.fixture
async def sc(make_sidecar: SidecarFactory, idp: ApproverIdP) -> RunningSidecar:
    return await make_sidecar(policy_dir=APPROVAL_POLICY, approvals=idp.config())


async def held(sc: RunningSidecar, method: str = "DELETE", path: str = "/crm/customers/42", *,
               task: str | None = None, body: bytes | None = None) -> dict[str, Any]:
    headers = {"X-Agent-Task": task} if task else {}
    async with httpx.AsyncClient() as agent:
        response = await agent.request(method, f"{sc.proxy}{path}", headers=headers, content=body)
    assert response.status_code == 403, response.text
    problem: dict[str, Any] = response.json()
    assert problem["code"] == "approval_required"
    assert response.headers["retry-after"]
    return problem


async def retry(sc: RunningSidecar, approval_id: str, method: str = "DELETE", path: str = "/crm/customers/42", *,
                task: str | None = None, body: bytes | None = None) -> httpx.Response:
    headers = {"X-Agent-Approval": approval_id, **({"X-Agent-Task": task} if task else {})}
    async with httpx.AsyncClient() as agent:
        return await agent.request(method, f"{sc.proxy}{path}", headers=headers, content=body)


async def test_hold_approve_retry_and_the_audit_chain_links_it_all(sc: RunningSidecar, echo_tool: EchoTool,
                                                                  idp: ApproverIdP) -> None:
    task = await open_task(sc.admin)
    problem = await held(sc, task=task)
    approval_id = problem["approval_id"]
    assert problem["approval_status_url"] == f"/v1/approvals/{approval_id}" and problem["decision_id"]
    assert echo_tool.seen == []

    approved = await approve(sc.admin, approval_id, idp.token(ALICE, ["approvers"]), comment="duplicate, fine")
    assert approved.status_code == 200, approved.text
    assert approved.json()["status"] == "approved"

    response = await retry(sc, approval_id, task=task)
    assert response.status_code == 200, response.text
    [seen] = echo_tool.seen
    assert seen.method == "DELETE" and seen.path == "/crm/customers/42"
    claims = jwt.decode(seen.headers["authorization"][0][7:], options={"verify_signature": False})
    assert claims["scope"] == "crm:write"  # the policy decided again, seeing input.approval

    requested = await audit_event(sc.audit_path, "approval.requested", approval_id)
    granted = await audit_event(sc.audit_path, "approval.approved", approval_id)
    used = await audit_event(sc.audit_path, "approval.used", approval_id)
    assert requested["decision_id"] == problem["decision_id"] == granted["decision_id"] == used["held_decision_id"]
    assert granted["approver"] == ALICE and granted["comment"] == "duplicate, fine"
    assert used["jti"] == claims["jti"] and used["decision_id"] == claims["decision_id"]
    assert requested["task_id"] == task


async def test_every_refusal_of_a_presented_approval_has_its_own_code(sc: RunningSidecar, echo_tool: EchoTool,
                                                                      idp: ApproverIdP) -> None:
    token = idp.token(ALICE, ["approvers"])
    task = await open_task(sc.admin)
    other_task = await open_task(sc.admin, "another task")
    body = b'{"name": "Ada", "tier": "gold"}'
    problem = await held(sc, "PUT", "/crm/customers/42", task=task, body=body)
    approval_id = problem["approval_id"]

    pending = await retry(sc, approval_id, "PUT", task=task, body=body)
    assert pending.json()["code"] == "approval_pending"
    assert (await approve(sc.admin, approval_id, token)).status_code == 200

    codes = {"body_sha256": "approval_wrong_body", "target": "approval_wrong_target",
             "method": "approval_wrong_method", "task_id": "approval_wrong_task"}
    cases = {
        "body_sha256": dict(method="PUT", path="/crm/customers/42", task=task, body=b'{"name": "Ada", "tier": "platinum"}'),
        "target": dict(method="PUT", path="/crm/customers/43", task=task, body=body),
        "method": dict(method="PATCH", path="/crm/customers/42", task=task, body=body),
        "task_id": dict(method="PUT", path="/crm/customers/42", task=other_task, body=body),
    }
    for differs, request in cases.items():
        response = await retry(sc, approval_id, **request)
        assert response.status_code == 403
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["code"] == codes[differs], differs
        assert response.json()["mismatch"] == differs
        assert response.json()["approval_id"] == approval_id
    assert echo_tool.seen == []

    assert (await retry(sc, approval_id, "PUT", task=task, body=body)).status_code == 200
    second = await retry(sc, approval_id, "PUT", task=task, body=body)
    assert second.status_code == 403 and second.json()["code"] == "approval_used"
    unknown = await retry(sc, "ap-00000000000000000000", "PUT", task=task, body=body)
    assert unknown.json()["code"] == "approval_invalid"
    assert len(echo_tool.seen) == 1


async def test_another_agent_cannot_use_the_approval(make_sidecar: SidecarFactory, sc: RunningSidecar,
                                                     echo_tool: EchoTool, idp: ApproverIdP) -> None:
    # A second sidecar for another agent, sharing the same SQLite store file.
    other = await make_sidecar(policy_dir=APPROVAL_POLICY, approvals=idp.config(),
                               identity={"static": "spiffe://test/ns/agents/sa/someone-else"})
    approval_id = (await held(sc))["approval_id"]
    assert (await approve(sc.admin, approval_id, idp.token(ALICE, ["approvers"]))).status_code == 200
    response = await retry(other, approval_id)
    assert response.json()["code"] == "approval_wrong_agent" and response.json()["mismatch"] == "agent"
    assert echo_tool.seen == []


async def test_denied_and_expired_approvals(sc: RunningSidecar, echo_tool: EchoTool, idp: ApproverIdP) -> None:
    denied_id = (await held(sc))["approval_id"]
    denial = await approve(sc.admin, denied_id, idp.token(BOB, ["approvers"]), comment="not today", verdict="deny")
    assert denial.status_code == 200 and denial.json()["status"] == "denied"
    assert denial.json()["denial"]["approver"] == BOB
    assert (await retry(sc, denied_id)).json()["code"] == "approval_denied"
    again = await approve(sc.admin, denied_id, idp.token(ALICE, ["approvers"]))
    assert again.status_code == 409 and again.json()["code"] == "approval_conflict"
    await audit_event(sc.audit_path, "approval.denied", denied_id)

    short_id = (await held(sc, path="/crm/short/7"))["approval_id"]  # the policy gives this one 1 second

    async def expired() -> bool:
        async with httpx.AsyncClient() as client:
            return bool((await client.get(f"{sc.admin}/v1/approvals/{short_id}")).json()["status"] == "expired")
    await eventually(expired, what="the 1-second approval to expire")
    late = await approve(sc.admin, short_id, idp.token(ALICE, ["approvers"]))
    assert late.status_code == 409 and late.json()["code"] == "approval_conflict"
    response = await retry(sc, short_id, path="/crm/short/7")
    assert response.status_code == 403 and response.json()["code"] == "approval_expired"
    await audit_event(sc.audit_path, "approval.expired", short_id)
    assert echo_tool.seen == []


async def test_the_agent_itself_can_never_approve(sc: RunningSidecar, echo_tool: EchoTool, idp: ApproverIdP) -> None:
    approval_id = (await held(sc))["approval_id"]
    # A perfectly valid token, in the right group, whose subject is the requesting agent.
    response = await approve(sc.admin, approval_id, idp.token(AGENT, ["approvers"]))
    assert response.status_code == 403 and response.json()["code"] == "approver_forbidden"
    assert (await retry(sc, approval_id)).json()["code"] == "approval_pending"


async def test_approver_tokens_are_verified(sc: RunningSidecar, idp: ApproverIdP) -> None:
    approval_id = (await held(sc))["approval_id"]
    stranger = ec.generate_private_key(ec.SECP256R1())
    rejected = {
        "expired": idp.token(ALICE, ["approvers"], lifetime=-120),
        "wrong_audience": idp.token(ALICE, ["approvers"], audience="someone-else"),
        "wrong_issuer": idp.token(ALICE, ["approvers"], issuer="https://evil.example"),
        "bad_signature": idp.token(ALICE, ["approvers"], key=stranger),
        "unknown_kid": idp.token(ALICE, ["approvers"], kid="nope"),
        "algorithm_not_allowed": jwt.encode({"sub": ALICE, "iss": "x", "aud": "y", "exp": 2**31}, "secret" * 8,
                                            algorithm="HS256", headers={"kid": idp.kid}),
        "none": jwt.encode({"sub": ALICE}, None, algorithm="none"),  # type: ignore[arg-type]
    }
    for name, token in rejected.items():
        response = await approve(sc.admin, approval_id, token)
        assert response.status_code == 401, name
        assert response.json()["code"] == "unauthorized", name
        assert token not in response.text
    async with httpx.AsyncClient() as client:
        missing = await client.post(f"{sc.admin}/v1/approvals/{approval_id}/approve", json={})
        listing = await client.get(f"{sc.admin}/v1/approvals")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert listing.status_code == 401
    wrong_group = await approve(sc.admin, approval_id, idp.token(ALICE, ["interns"]))
    assert wrong_group.status_code == 403 and wrong_group.json()["code"] == "approver_forbidden"
    async with httpx.AsyncClient() as client:
        shown = (await client.get(f"{sc.admin}/v1/approvals/{approval_id}")).json()
    assert shown["status"] == "pending" and shown["approvals"] == []


async def test_two_distinct_approvers_are_needed_when_the_policy_says_so(sc: RunningSidecar, echo_tool: EchoTool,
                                                                        idp: ApproverIdP) -> None:
    task = await open_task(sc.admin, "refund duplicate charge")
    approval_id = (await held(sc, "DELETE", "/payments/charges/ch_1", task=task))["approval_id"]
    first = await approve(sc.admin, approval_id, idp.token(ALICE, ["finance"]))
    assert first.status_code == 200 and first.json()["status"] == "pending"
    assert (await retry(sc, approval_id, "DELETE", "/payments/charges/ch_1", task=task)).json()["code"] == "approval_pending"
    same_again = await approve(sc.admin, approval_id, idp.token(ALICE, ["finance"]))
    assert same_again.status_code == 403 and same_again.json()["code"] == "approver_forbidden"
    not_finance = await approve(sc.admin, approval_id, idp.token(BOB, ["approvers"]))
    assert not_finance.status_code == 403
    second = await approve(sc.admin, approval_id, idp.token(BOB, ["finance", "approvers"]))
    assert second.status_code == 200 and second.json()["status"] == "approved"
    assert [a["approver"] for a in second.json()["approvals"]] == [ALICE, BOB]
    response = await retry(sc, approval_id, "DELETE", "/payments/charges/ch_1", task=task)
    assert response.status_code == 200, response.text
    assert len(echo_tool.seen) == 1


async def test_prefer_wait_holds_the_call_and_releases_it_on_approval(sc: RunningSidecar, echo_tool: EchoTool,
                                                                      idp: ApproverIdP) -> None:
    task = await open_task(sc.admin)
    async with httpx.AsyncClient(timeout=60) as agent:
        call = asyncio.create_task(agent.delete(f"{sc.proxy}/crm/customers/42",
                                                headers={"X-Agent-Task": task, "Prefer": "wait=30"}))
        listed = await eventually(lambda: _pending(sc, idp), what="the held call's approval")
        assert not call.done()
        [approval] = listed
        assert approval["task"]["intent"] == "clean up duplicate customer records"
        assert (await approve(sc.admin, approval["id"], idp.token(ALICE, ["approvers"]))).status_code == 200
        response = await call
    assert response.status_code == 200, response.text
    assert len(echo_tool.seen) == 1
    await audit_event(sc.audit_path, "approval.used", approval["id"])


async def test_prefer_wait_refuses_on_denial(sc: RunningSidecar, echo_tool: EchoTool, idp: ApproverIdP) -> None:
    async with httpx.AsyncClient(timeout=60) as agent:
        call = asyncio.create_task(agent.delete(f"{sc.proxy}/crm/customers/9", headers={"Prefer": "wait=30"}))
        [approval] = await eventually(lambda: _pending(sc, idp), what="the held call's approval")
        assert (await approve(sc.admin, approval["id"], idp.token(BOB, ["approvers"]), verdict="deny")).status_code == 200
        response = await call
    assert response.status_code == 403 and response.json()["code"] == "approval_denied"
    assert response.json()["approval_id"] == approval["id"]
    assert echo_tool.seen == []


async def test_prefer_wait_is_capped_by_config_and_then_says_approval_required(
        make_sidecar: SidecarFactory, echo_tool: EchoTool, idp: ApproverIdP) -> None:
    sc = await make_sidecar(policy_dir=APPROVAL_POLICY, approvals=idp.config(max_wait_seconds=1))
    async with httpx.AsyncClient(timeout=60) as agent:
        response = await agent.delete(f"{sc.proxy}/crm/customers/42", headers={"Prefer": "wait=600"})
    assert response.status_code == 403
    problem = response.json()
    assert problem["code"] == "approval_required" and "within 1s" in problem["detail"]
    assert response.headers["retry-after"]
    # The approval is still there: approve it and the plain retry goes through.
    assert (await approve(sc.admin, problem["approval_id"], idp.token(ALICE, ["approvers"]))).status_code == 200
    assert (await retry(sc, problem["approval_id"])).status_code == 200


async def test_metrics_count_pending_and_resolved(sc: RunningSidecar, idp: ApproverIdP) -> None:
    first = (await held(sc))["approval_id"]
    await held(sc, path="/crm/customers/43")
    assert _metric(await _scrape(sc), "agent_sidecar_approvals_pending") == 2
    await approve(sc.admin, first, idp.token(ALICE, ["approvers"]))
    assert (await retry(sc, first)).status_code == 200
    text = await _scrape(sc)
    assert _metric(text, "agent_sidecar_approvals_pending") == 1
    assert _metric(text, 'agent_sidecar_approvals_resolved_total{outcome="approved"}') == 1
    assert _metric(text, 'agent_sidecar_approvals_resolved_total{outcome="used"}') == 1


async def test_cli_lists_shows_approves_and_denies(sc: RunningSidecar, echo_tool: EchoTool, idp: ApproverIdP,
                                                   tmp_path: Path) -> None:
    to_approve = (await held(sc))["approval_id"]
    to_deny = (await held(sc, path="/crm/customers/99"))["approval_id"]
    token = idp.token(ALICE, ["approvers"])
    token_file = tmp_path / "approver.token"
    token_file.write_text(token)
    env = {**os.environ, "AGENT_SIDECAR_ADMIN": sc.admin}

    async def cli(*args: str, token_env: bool = True) -> subprocess.CompletedProcess[str]:
        run_env = {**env, "AGENT_SIDECAR_APPROVER_TOKEN": token} if token_env else env
        return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "sidecar", "approvals", *args],
                                       capture_output=True, text=True, env=run_env, timeout=60)

    listed = await cli("list")
    assert listed.returncode == 0, listed.stderr
    assert to_approve in listed.stdout and to_deny in listed.stdout and "DELETE" in listed.stdout
    shown = await cli("show", to_approve, token_env=False)
    assert shown.returncode == 0 and "pending" in shown.stdout
    approved = await cli("approve", to_approve, "--token-file", str(token_file), "-m", "looked at it", token_env=False)
    assert approved.returncode == 0, approved.stderr
    assert " approved " in approved.stdout
    denied = await cli("deny", to_deny, "--comment", "wrong customer")
    assert denied.returncode == 0 and " denied " in denied.stdout
    refused = await cli("approve", to_deny)
    assert refused.returncode == 1 and "approval_conflict" in refused.stderr
    no_token = await cli("list", token_env=False)
    assert no_token.returncode == 1 and "AGENT_SIDECAR_APPROVER_TOKEN" in no_token.stderr
    for result in (listed, shown, approved, denied, refused):
        assert token not in result.stdout + result.stderr
    assert (await retry(sc, to_approve)).status_code == 200
    assert "looked at it" in str([e for e in audit_events(sc.audit_path) if e.get("type") == "approval.approved"])


async def test_config_errors_name_the_key(tmp_path: Path, echo_tool: EchoTool) -> None:
    from sidecar.config import ConfigError, parse_config

    from harness import sidecar_config

    def error(**overrides: Any) -> str:
        with pytest.raises(ConfigError) as caught:
            parse_config(sidecar_config(tmp_path, echo_tool.base, **overrides), tmp_path / "sidecar.yaml")
        return str(caught.value)

    assert error(approvals={"max_wait_seconds": -1}) == "sidecar.yaml: approvals.max_wait_seconds: must be between 0 and 3600"
    assert error(approvals={"approvers": {"jwks": "missing.json", "issuer": "i", "audience": "a"}}).startswith(
        "sidecar.yaml: approvals.approvers.jwks: no such file")
    assert error(approvals={"approvers": {"jwks": "https://idp.example/jwks", "issuer": "i"}}) == \
        "sidecar.yaml: approvals.approvers.audience: is required"
    assert error(approvals={"webhook": {"url": "ftp://x"}}) == "sidecar.yaml: approvals.webhook.url: not an http(s) URL"
    assert error(approvals={"surprise": 1}) == "sidecar.yaml: approvals.surprise: unknown key"


async def _pending(sc: RunningSidecar, idp: ApproverIdP) -> list[dict[str, Any]]:
    return await list_pending(sc.admin, idp.token(ALICE, ["approvers"]))


async def _scrape(sc: RunningSidecar) -> str:
    async with httpx.AsyncClient() as client:
        return (await client.get(f"{sc.metrics}/metrics")).text


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in metrics")
