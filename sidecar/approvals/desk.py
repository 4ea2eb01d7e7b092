"""The approver's side: identify the approver, audit a verdict, then record it, then count it.

A verdict counts only once its audit event is written: it is worked out on a copy of the
approval, audited (waiting for the writer's receipt), and only then applied by the store,
which refuses it if the approval changed in between. An audit log that cannot be written
refuses the verdict (``audit_unavailable``) and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import jwt

from ..audit import AuditSink
from ..audit.evidence import write_after, write_first
from ..observability.metrics import Metrics
from ..problems import Refusal
from .approvers import Approver, ApproverVerifier, bearer_token
from .preview import PreviewSettings
from .store import Approval, ApprovalStore, PendingLimits, Verdict, apply_verdict, copy_of, outcome
from .webhook import WebhookNotifier



@dataclass(frozen=True)
class HoldSettings:
    """How the request path holds calls: the cap on ``Prefer: wait``, how many may wait for a human at once,
    who to tell, what they see of the body."""

    max_wait_seconds: float = 60.0
    default_expiry_seconds: int = 900
    pending_limits: PendingLimits = field(default_factory=PendingLimits)
    notifier: WebhookNotifier | None = None
    preview: PreviewSettings = field(default_factory=PreviewSettings)  # what approvers see of a held body


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
        preview = await self._preview(approval_id, verdict)
        event = self._verdict_event(preview, approver, comment)
        await write_first(self.audit, event, Refusal(
            "audit_unavailable", "the audit log cannot be written; the verdict was not recorded and nothing changed",
            approval_id=approval_id))
        try:
            approval = await self.store.decide(approval_id, replace(verdict, expected=outcome(preview)))
        except Refusal as refusal:
            write_after(self.audit, {**event, "type": "approval.verdict_not_applied", "code": refusal.code})
            raise
        if approval.status in ("approved", "denied") and self.metrics is not None:
            self.metrics.approvals_resolved.labels(approval.status).inc()
        await self.refresh_pending_gauge()
        return approval

    def refused(self, approval_id: str, action: str, refusal: Refusal, authorization: str | None,
                approver: Approver | None) -> None:
        """A refused approver action is evidence: audited with who the approver claimed to be, counted by code.

        The identity is the verified ``sub`` when the token was verified, else the ``sub`` the token claims
        (read without trusting it, and marked so); the token itself is never recorded.
        """
        if self.metrics is not None:
            self.metrics.refusals.labels(refusal.code).inc()
        claimed = approver.subject if approver is not None else _claimed_subject(authorization)
        event = {"type": "approval.refused", "approval_id": approval_id[:100], "action": action, "code": refusal.code,
                 "detail": refusal.detail[:300], "approver": claimed, "approver_verified": approver is not None}
        if refusal.extra.get("token_error"):
            event["token_error"] = refusal.extra["token_error"]
        write_after(self.audit, event)

    async def _preview(self, approval_id: str, verdict: Verdict) -> Approval:
        """The approval as this verdict would leave it; the refusal if it may not be given."""
        current = await self.store.get(approval_id)
        if current is None:
            raise Refusal("approval_invalid", "no such approval")
        preview = copy_of(current)
        apply_verdict(preview, verdict, verdict.at)
        return preview

    @staticmethod
    def _verdict_event(preview: Approval, approver: Approver, comment: str) -> dict[str, Any]:
        kind = {"approved": "approval.approved", "denied": "approval.denied"}.get(preview.status, "approval.approver_added")
        return {
            "type": kind, "approval_id": preview.id, "decision_id": preview.decision_id,
            "task_id": preview.binding.task_id, "agent": preview.binding.agent, "approver": approver.subject,
            "comment": comment[:1000], "approvals": len(preview.approvals), "approvers_required": preview.approvers_required,
        }

    async def refresh_pending_gauge(self) -> None:
        if self.metrics is None:
            return
        try:
            self.metrics.approvals_pending.set(await self.store.count_pending())
        except Refusal:
            pass  # the store's own readiness check reports this

    async def close(self) -> None:
        if self.notifier is not None:
            await self.notifier.close()
        await self.store.close()


def _claimed_subject(authorization: str | None) -> str | None:
    """The ``sub`` an unverified bearer token claims (bounded), or None when there is none to read."""
    if not authorization or authorization[:7].lower() != "bearer ":
        return None
    try:
        claims = jwt.decode(authorization[7:].strip(), options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    subject = claims.get("sub") if isinstance(claims, dict) else None
    return subject[:200] if isinstance(subject, str) and subject else None
