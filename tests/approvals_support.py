"""Shared parts of the approval tests: an approvers' identity provider the test owns, polling, audit reading."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import harness
import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from harness import ROOT

APPROVAL_POLICY = ROOT / "tests" / "policies" / "approvals"
AGENT = "spiffe://test/ns/agents/sa/agent-under-test"
ISSUER = "https://idp.test.example"
AUDIENCE = "agent-sidecar-approvals"

T = TypeVar("T")


class ApproverIdP:
    """An OIDC provider in miniature: its own EC key, a JWKS file, and ID tokens on demand."""

    def __init__(self, directory: Path) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.kid = "idp-" + uuid.uuid4().hex[:8]
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key()))
        jwk.update({"kid": self.kid, "use": "sig", "alg": "ES256"})
        self.jwks_path = directory / "approvers-jwks.json"
        self.jwks_path.write_text(json.dumps({"keys": [jwk]}))

    def token(self, subject: str, groups: list[str], *, issuer: str = ISSUER, audience: str = AUDIENCE,
              lifetime: int = 300, key: Any = None, kid: str | None = None) -> str:
        now = int(time.time())
        claims = {"iss": issuer, "aud": audience, "sub": subject, "groups": groups, "iat": now, "exp": now + lifetime,
                  "preferred_username": subject.split("@")[0]}
        return jwt.encode(claims, key or self.key, algorithm="ES256", headers={"kid": kid or self.kid})

    def config(self, **approvals: Any) -> dict[str, Any]:
        section: dict[str, Any] = {"max_wait_seconds": 30,
                                   "approvers": {"jwks": str(self.jwks_path), "issuer": ISSUER, "audience": AUDIENCE}}
        section.update(approvals)
        return section


async def eventually(probe: Callable[[], Awaitable[T | None]], *, deadline: float = 20.0, what: str = "condition") -> T:
    """Poll ``probe`` until it returns something truthy (a condition with a deadline, not a sleep)."""
    end = time.monotonic() + deadline
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def exfiltration_routes(upstream: str, external: str = "publish") -> list[dict[str, Any]]:
    """A confidential route and an external one: a write to the second after a read of the first is an
    exfiltration chain to the shipped library."""
    return [
        {"name": "crm", "match": {"path_prefix": "/crm"}, "upstream": f"{upstream}/crm",
         "labels": {"environment": "dev", "data_classification": "confidential"}},
        {"name": external, "match": {"path_prefix": f"/{external}"}, "upstream": f"{upstream}/{external}",
         "labels": {"environment": "dev", "external": True}},
    ]


def audit_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def audit_event(path: Path, kind: str, approval_id: str) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        for event in audit_events(path):
            if event.get("type") == kind and event.get("approval_id") == approval_id:
                return event
        return None
    return await eventually(probe, what=f"audit event {kind} for {approval_id}")


async def approve(admin: str, approval_id: str, token: str, comment: str = "ok", verdict: str = "approve") -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.post(f"{admin}/v1/approvals/{approval_id}/{verdict}", json={"comment": comment},
                                 headers={"Authorization": f"Bearer {token}"})


async def open_task(admin: str, intent: str = "clean up duplicate customer records") -> str:
    return await harness.open_task(admin, intent)


async def list_pending(admin: str, token: str) -> list[dict[str, Any]]:
    """GET /v1/approvals as an approver: the pending approvals."""
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{admin}/v1/approvals", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    approvals: list[dict[str, Any]] = response.json()["approvals"]
    return approvals


PUBLISH_BODY = b'{"text": "hello"}'


async def publish_approved_then_confidential_read(agent: httpx.AsyncClient, proxy: str, admin: str, task: str,
                                                  token: str) -> tuple[str, dict[str, str]]:
    """The exfiltration set-up (routes: exfiltration_routes): an external publish is held, the holder of ``token``
    approves it, then the task reads confidential data (allowed). Returns the approval id and the publish's headers:
    the publish retried with that approval is now an exfiltration chain."""
    headers = {"X-Agent-Task": task, "Content-Type": "application/json"}
    held = await agent.post(f"{proxy}/publish/posts", content=PUBLISH_BODY, headers=headers)
    assert held.status_code == 403 and held.json()["code"] == "approval_required", held.text
    approval_id: str = held.json()["approval_id"]
    granted = await approve(admin, approval_id, token)
    assert granted.status_code == 200, granted.text
    read = await agent.get(f"{proxy}/crm/customers/42", headers={"X-Agent-Task": task})
    assert read.status_code == 200, read.text  # nothing stops a read; it turns the publish into a chain
    return approval_id, headers
