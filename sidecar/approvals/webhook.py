"""Tell approvers that a call is waiting: a JSON POST to a configured webhook.

The payload carries the approval id, a one-line summary, the approver page's URL and the body
preview (pretty-printed, the fields in ``approvals.mask_fields`` masked, the measured and
highlighted values set apart), and never a credential: no token, no header the agent sent, no
query string, no masked value. Delivery runs on
a background task fed by a bounded queue, so a slow or dead receiver never holds up the
request path; each event is retried with exponential backoff, then dropped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .preview import key_values
from .store import Approval

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("sidecar.approvals.webhook")


def requested_event(approval: Approval, page_url: str) -> dict[str, Any]:
    target = urlsplit(approval.binding.target)
    where = f"{target.scheme}://{target.netloc}{target.path}"  # no query: it may hold anything the agent put there
    task = f" in task {approval.binding.task_id}" if approval.binding.task_id else ""
    return {
        "type": "approval.requested",
        "approval_id": approval.id,
        "summary": f"{approval.binding.method} {where} by {approval.binding.agent}{task} needs approval "
                   f"({approval.risk} risk): {'; '.join(approval.reasons)[:500]}{_values(approval)}",
        "route": approval.route,
        "risk": approval.risk,
        "reasons": approval.reasons,
        "intent": approval.intent,
        "approvers_required": approval.approvers_required,
        "group": approval.group,
        "expires_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(approval.expires_at)),
        "url": f"{page_url}#{approval.id}",
        # Masked and bounded when the call was held (sidecar/approvals/preview.py); None for records from before.
        "body": asdict(approval.body) if approval.body is not None else None,
    }


def _values(approval: Approval) -> str:
    """`` [amount 5000, $.payee ACME]``: the values set apart, for receivers that show only the summary."""
    if approval.body is None:
        return ""
    pairs = key_values(asdict(approval.body))[:8]
    return f" [{', '.join(f'{label} {value[:80]}' for label, value in pairs)}]" if pairs else ""


class WebhookNotifier:
    def __init__(self, url: str, *, page_url: str, max_attempts: int = 5, backoff_seconds: float = 0.5,
                 timeout_seconds: float = 5.0, queue_size: int = 1000) -> None:
        self.url = url
        self.page_url = page_url
        self.max_attempts = max_attempts
        self.backoff_seconds = backoff_seconds
        self.timeout_seconds = timeout_seconds
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=queue_size)
        self._worker: asyncio.Task[None] | None = None
        self.delivered = 0
        self.dropped = 0

    def notify(self, approval: Approval) -> None:
        """Queue a notification; never blocks and never fails the call that asked for it."""
        try:
            self._queue.put_nowait(requested_event(approval, self.page_url))
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("webhook queue full; approval %s not notified", approval.id)
            return
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._deliver_forever(), name="approvals-webhook")

    async def _deliver_forever(self) -> None:
        import httpx  # only a sidecar with a webhook configured pays its memory

        async with httpx.AsyncClient(timeout=self.timeout_seconds, follow_redirects=False) as client:
            while True:
                event = await self._queue.get()
                try:
                    await self._deliver(client, event)
                finally:
                    self._queue.task_done()

    async def _deliver(self, client: httpx.AsyncClient, event: dict[str, Any]) -> None:
        import httpx

        body = json.dumps(event, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "agent-sidecar-approvals"}
        for attempt in range(1, self.max_attempts + 1):
            try:
                response = await client.post(self.url, content=body, headers=headers)
                if 200 <= response.status_code < 300:
                    self.delivered += 1
                    return
                problem = f"status {response.status_code}"
            except httpx.HTTPError as exc:
                problem = type(exc).__name__
            log.warning("webhook attempt %d/%d for %s failed: %s", attempt, self.max_attempts,
                        event["approval_id"], problem)
            if attempt < self.max_attempts:
                await asyncio.sleep(self.backoff_seconds * 2 ** (attempt - 1))
        self.dropped += 1

    async def drain(self) -> None:
        """Wait until every queued notification was delivered or given up (shutdown, tests)."""
        await self._queue.join()

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
