"""Approvers are notified through a webhook: a real aiohttp receiver on loopback that fails first."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from aiohttp import web

from approvals_support import APPROVAL_POLICY, ApproverIdP, eventually, open_task
from harness import SidecarFactory
from harness import free_port


@dataclass
class Receiver:
    """Answers 500 to the first ``failures`` deliveries, then 204; keeps every request."""

    failures: int = 1
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    port: int = 0
    runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append(({k.lower(): v for k, v in request.headers.items()}, await request.read()))
        return web.Response(status=500 if len(self.received) <= self.failures else 204)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks/approvals", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        self.port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()


async def test_webhook_gets_json_without_any_credential_and_is_retried(make_sidecar: SidecarFactory,
                                                                        tmp_path: Path) -> None:
    receiver = Receiver(failures=1)
    await receiver.start()
    idp = ApproverIdP(tmp_path)
    sc = await make_sidecar(policy_dir=APPROVAL_POLICY, approvals=idp.config(
        page_url="https://approvals.example.com/ui",
        webhook={"url": f"http://127.0.0.1:{receiver.port}/hooks/approvals", "backoff_seconds": 0.05}))
    try:
        task = await open_task(sc.admin, "remove a stale customer")
        async with httpx.AsyncClient() as agent:
            response = await agent.delete(f"{sc.proxy}/crm/customers/42?api_key=agent-secret-in-query",
                                          headers={"X-Agent-Task": task, "Authorization": "Bearer agent-own-token",
                                                   "X-Api-Key": "agent-api-key"})
        approval_id = response.json()["approval_id"]

        async def delivered() -> bool:
            return len(receiver.received) >= 2
        await eventually(delivered, what="the retried webhook delivery")

        first, second = receiver.received[:2]
        assert first[1] == second[1]  # the same event, retried after the 500
        assert "authorization" not in second[0] and "cookie" not in second[0] and "x-api-key" not in second[0]
        assert second[0]["content-type"] == "application/json"
        raw = second[1].decode()
        for secret in ("agent-own-token", "agent-api-key", "agent-secret-in-query", "Bearer"):
            assert secret not in raw
        event = json.loads(raw)
        assert event["type"] == "approval.requested" and event["approval_id"] == approval_id
        assert event["url"] == f"https://approvals.example.com/ui/#{approval_id}"
        assert event["summary"].startswith("DELETE http://127.0.0.1:") and "/crm/customers/42 " in event["summary"]
        assert task in event["summary"] and event["intent"] == "remove a stale customer"
        assert event["reasons"] == ["approvals fixture: DELETE on crm needs a human"]
    finally:
        assert receiver.runner is not None
        await receiver.runner.cleanup()
