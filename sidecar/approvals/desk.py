"""The approver's side: identify the approver, record a verdict, audit it, count it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ..audit import AuditError, AuditSink
from ..observability.metrics import Metrics
from ..problems import Refusal
from .approvers import Approver, ApproverVerifier, bearer_token
from .store import Approval, ApprovalStore, Verdict
from .webhook import WebhookNotifier

log = logging.getLogger("sidecar.approvals")


@dataclass(frozen=True)
class HoldSettings:
    """How the request path holds calls: the cap on ``Prefer: wait`` and who to tell."""

    max_wait_seconds: float = 60.0
    default_expiry_seconds: int = 900
    notifier: WebhookNotifier | None = None


class ApprovalDesk:
    def __init__(self, store: ApprovalStore, *, verifier: ApproverVerifier | None, audit: AuditSink | None,
                 metrics: Metrics | None, notifier: WebhookNotifier | None = None) -> None:
        self.store = store
        self.verifier = verifier
        self.audit = audit
        self.metrics = metrics
        self.notifier = notifier

    async def identify(self, authorization: str | None) -> Approver:
        token = bearer_token(authorization)
        if self.verifier is None:
            raise Refusal("unauthorized", "no approver identity provider is configured (approvals.approvers)")
        return await self.verifier.verify(token)

    async def decide(self, approval_id: str, approver: Approver, *, approve: bool, comment: str) -> Approval:
        verdict = Verdict(approver=approver.subject, groups=approver.groups, approve=approve, comment=comment)
        approval = await self.store.decide(approval_id, verdict)
        kind = {"approved": "approval.approved", "denied": "approval.denied"}.get(approval.status, "approval.approver_added")
        self._audit({
            "type": kind, "approval_id": approval.id, "decision_id": approval.decision_id,
            "task_id": approval.binding.task_id, "agent": approval.binding.agent, "approver": approver.subject,
            "comment": comment[:1000], "approvals": len(approval.approvals), "approvers_required": approval.approvers_required,
        })
        if approval.status in ("approved", "denied") and self.metrics is not None:
            self.metrics.approvals_resolved.labels(approval.status).inc()
        await self.refresh_pending_gauge()
        return approval

    async def refresh_pending_gauge(self) -> None:
        if self.metrics is None:
            return
        try:
            self.metrics.approvals_pending.set(await self.store.count_pending())
        except Refusal:
            pass  # the store's own readiness check reports this

    def _audit(self, event: dict[str, Any]) -> None:
        if self.audit is None:
            return
        try:
            self.audit.append(event)
        except AuditError:
            log.error("audit log cannot be written: %s for %s not recorded", event["type"], event["approval_id"])
            if self.metrics is not None:
                self.metrics.audit_write_errors.inc()

    async def close(self) -> None:
        if self.notifier is not None:
            await self.notifier.close()
        await self.store.close()
