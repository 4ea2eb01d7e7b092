"""Approval records bound to one exact request, and the store protocol."""

from __future__ import annotations

import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class RequestBinding:
    """What an approval is valid for: this method, target, body, agent and task only."""

    method: str
    target: str
    body_sha256: str
    agent: str
    task_id: str | None

    def mismatch(self, other: RequestBinding) -> str | None:
        for name in ("method", "target", "body_sha256", "agent", "task_id"):
            if getattr(self, name) != getattr(other, name):
                return name
        return None


@dataclass
class Approval:
    id: str
    binding: RequestBinding
    decision_id: str
    route: str
    reasons: list[str]
    risk: str
    approvers_required: int
    group: str | None
    created_at: float
    expires_at: float
    status: str = "pending"  # pending | approved | denied | used | expired
    approvals: list[dict[str, Any]] = field(default_factory=list)  # [{"approver", "comment", "at"}]
    denial: dict[str, Any] | None = None
    intent: str | None = None

    def public(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["binding"] = asdict(self.binding)
        return doc


class ApprovalStore(Protocol):
    async def create(self, approval: Approval) -> None: ...

    async def get(self, approval_id: str) -> Approval | None: ...

    async def consume(self, approval_id: str) -> bool:
        """Mark an approved approval used; False if it was not approved or already used."""
        ...


def new_approval_id() -> str:
    return "ap-" + secrets.token_hex(10)


class MemoryApprovalStore:
    """Bounded in-memory store (tests and the simplest runs)."""

    def __init__(self, max_records: int = 10_000) -> None:
        self.max_records = max_records
        self._records: dict[str, Approval] = {}

    async def create(self, approval: Approval) -> None:
        if len(self._records) >= self.max_records:
            oldest = min(self._records.values(), key=lambda a: a.created_at)
            del self._records[oldest.id]
        self._records[approval.id] = approval

    async def get(self, approval_id: str) -> Approval | None:
        approval = self._records.get(approval_id)
        if approval is not None and approval.status in ("pending", "approved") and time.time() >= approval.expires_at:
            approval.status = "expired"
        return approval

    async def consume(self, approval_id: str) -> bool:
        approval = await self.get(approval_id)
        if approval is None or approval.status != "approved":
            return False
        approval.status = "used"
        return True
