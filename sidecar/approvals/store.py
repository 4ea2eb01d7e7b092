"""Approval records bound to one exact request, the store protocol, and the in-memory store.

Every rule about who may decide what lives in :func:`apply_verdict`, so the SQLite,
Redis and memory stores enforce exactly the same thing inside their own atomic update.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from ..problems import Refusal
from .preview import BodyPreview

MAX_COMMENT = 1000
PENDING_LIST_LIMIT = 500
# A held call re-reads its approval at least this often even if no wake-up arrives
# (a pub/sub message lost while Redis reconnected, a decision made by another process).
POLL_SECONDS = 1.0
# What a call refused for too many pending approvals is told: a human decides at an unknown time.
PENDING_LIMIT_RETRY_AFTER_SECONDS = 30


@dataclass(frozen=True)
class RequestBinding:
    """What an approval is valid for: this method, target, body, agent, task and route only.

    The route too: two routes can reach the same upstream target, each with its own credential (audience,
    scopes); the approver approved the call on the route shown. Records stored before the route was bound
    have ``route=""`` and match no call."""

    method: str
    target: str
    body_sha256: str
    agent: str
    task_id: str | None
    route: str = ""

    @property
    def key(self) -> str:
        """One string for the whole binding: approvals are looked up by it when a client cannot send their id."""
        fields = "\n".join((self.method, self.target, self.body_sha256, self.agent, self.task_id or "", self.route))
        return hashlib.sha256(fields.encode()).hexdigest()

    def mismatch(self, other: RequestBinding) -> str | None:
        for name in ("method", "target", "body_sha256", "agent", "task_id", "route"):
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
    used_at: float | None = None
    # What the approver sees of the body (sidecar/approvals/preview.py); None in records stored before it existed.
    body: BodyPreview | None = None
    # The target as approvers and the API see it: the values of masked query parameters replaced
    # (approvals.mask_fields); the binding keeps the exact one. None in records stored before it existed.
    shown_target: str | None = None
    # The rules that held the call when the humans were asked: the approval covers the call for those, and the
    # shipped library does not count it once another rule holds it too. Empty in records stored before.
    rules: list[str] = field(default_factory=list)

    def effective_status(self, now: float) -> str:
        if self.status in ("pending", "approved") and now >= self.expires_at:
            return "expired"
        return self.status

    def public(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["binding"] = asdict(self.binding)
        # A record stored before shown_target existed shows no query: it may hold a secret.
        before, question, _ = self.binding.target.partition("?")
        doc["binding"]["target"] = self.shown_target if self.shown_target is not None else \
            before + ("?[query not shown]" if question else "")
        del doc["shown_target"]
        doc["status"] = self.effective_status(time.time())
        return doc

    def to_json(self) -> str:
        doc = asdict(self)
        doc["binding"] = asdict(self.binding)
        return json.dumps(doc, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Approval:
        doc = json.loads(text)
        doc["binding"] = RequestBinding(**doc["binding"])
        if isinstance(doc.get("body"), dict):
            doc["body"] = BodyPreview.from_doc(doc["body"])
        # A field added by a later version is ignored, so a shared store can be read during a rolling upgrade.
        return cls(**{name: value for name, value in doc.items() if name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Verdict:
    """One approver's decision on one approval, from a verified token.

    ``expected`` is the outcome, (status, approvals given), that was audited before the verdict is
    applied: if the approval changed in between, the store refuses the verdict rather than let it
    count for something the audit chain does not say.
    """

    approver: str
    groups: tuple[str, ...]
    approve: bool
    comment: str = ""
    at: float = field(default_factory=time.time)
    expected: tuple[str, int] | None = None


def outcome(approval: Approval) -> tuple[str, int]:
    return approval.status, len(approval.approvals)


def copy_of(approval: Approval) -> Approval:
    return Approval.from_json(approval.to_json())


def apply_verdict(approval: Approval, verdict: Verdict, now: float) -> None:
    """Record a verdict, or raise the refusal that says why this approver may not give it."""
    status = approval.effective_status(now)
    if status != "pending":
        approval.status = status
        raise Refusal("approval_conflict", f"approval {approval.id} is already {status}", approval_id=approval.id)
    if verdict.approver == approval.binding.agent:
        raise Refusal("approver_forbidden", "the agent that made the request can never decide on it",
                      approval_id=approval.id)
    if approval.group is not None and approval.group not in verdict.groups:
        raise Refusal("approver_forbidden", f"this approval needs a member of group {approval.group!r}",
                      approval_id=approval.id)
    if any(entry["approver"] == verdict.approver for entry in approval.approvals):
        raise Refusal("approver_forbidden", "this approver already approved; a second, distinct approver is needed",
                      approval_id=approval.id)
    entry = {"approver": verdict.approver, "comment": verdict.comment[:MAX_COMMENT], "at": verdict.at}
    if not verdict.approve:
        approval.denial = entry
        approval.status = "denied"
    else:
        approval.approvals.append(entry)
        if len(approval.approvals) >= approval.approvers_required:
            approval.status = "approved"
    if verdict.expected is not None and outcome(approval) != verdict.expected:
        raise Refusal("approval_conflict", "the approval changed while this verdict was being recorded; look again",
                      approval_id=approval.id)


def mark_used(approval: Approval, now: float) -> bool:
    """Single use: only an approved, unexpired approval becomes used, exactly once."""
    status = approval.effective_status(now)
    if status != "approved":
        approval.status = status
        return False
    approval.status = "used"
    approval.used_at = now
    return True


@dataclass(frozen=True)
class PendingLimits:
    """How many approvals may wait for a human at once, counted by the store as it files one more.

    Per task (the calls an agent makes outside any task count as one task of that agent) and per agent over
    all its tasks: an agent can open tasks at will, so the per-task limit alone bounds nothing."""

    per_task: int = 8
    per_agent: int = 32


def too_many_pending(scope: str, limit: int) -> Refusal:
    """The refusal of one more approval past ``limit`` pending in ``scope`` ("task" or "agent")."""
    whose = "this task" if scope == "task" else "this agent (over all its tasks)"
    return Refusal("too_many_pending_approvals",
                   f"{limit} approvals of {whose} are already waiting for a human; this call was not forwarded and "
                   f"nobody was asked: retry once one of them is decided or expires",
                   extra={"pending_scope": scope, "max_pending": limit},
                   headers={"Retry-After": str(PENDING_LIMIT_RETRY_AFTER_SECONDS)})


def asks_the_same(approval: Approval, other: Approval) -> bool:
    """Whether ``other`` asks the humans what ``approval`` asks: the same approvers, group, risk and rules."""
    return (approval.approvers_required == other.approvers_required and approval.group == other.group
            and approval.risk == other.risk and set(approval.rules) == set(other.rules))


def pending_twin(newest: Approval | None, approval: Approval, now: float) -> Approval | None:
    """The approval to give ``approval``'s call instead of filing it: the newest one made for the same binding, if it
    still waits for a human and asks the same (one call, one approval, one place, however many copies are sent)."""
    if newest is not None and newest.effective_status(now) == "pending" and asks_the_same(newest, approval):
        return newest
    return None


def refuse_past_limits(limits: PendingLimits, pending_in_task: int, pending_of_agent: int) -> None:
    """Raise the refusal when one more pending approval would go past a limit (the stores count, this judges)."""
    if pending_in_task >= limits.per_task:
        raise too_many_pending("task", limits.per_task)
    if pending_of_agent >= limits.per_agent:
        raise too_many_pending("agent", limits.per_agent)


class ApprovalStore(Protocol):
    async def create(self, approval: Approval, limits: PendingLimits | None = None) -> Approval:
        """File a new pending approval and return it; or, when the newest approval for the same binding is still
        pending and asks the same (:func:`pending_twin`), file nothing and return that one. With ``limits``, refuse
        a new one (Refusal too_many_pending_approvals) when its task or its agent already has that many pending.
        Looked up, counted and filed in one atomic step, so that calls held at once, on one sidecar or on replicas
        sharing the store, never file past a limit and identical ones file one approval."""
        ...

    async def get(self, approval_id: str) -> Approval | None: ...

    async def consume(self, approval_id: str) -> bool:
        """Mark an approved approval used; False if it was not approved or already used."""
        ...

    async def decide(self, approval_id: str, verdict: Verdict) -> Approval:
        """Apply one verdict atomically; raise Refusal when it is not allowed."""
        ...

    async def for_binding(self, binding: RequestBinding) -> Approval | None:
        """The newest approval made for exactly this binding (any status), or None."""
        ...

    async def list_pending(self, limit: int = PENDING_LIST_LIMIT) -> list[Approval]: ...

    async def count_pending(self) -> int: ...

    async def wait(self, approval_id: str, timeout_seconds: float) -> Approval | None:
        """Return as soon as the approval leaves ``pending`` or the timeout passes."""
        ...

    async def ping(self) -> tuple[bool, str]: ...

    async def close(self) -> None: ...


def new_approval_id() -> str:
    return "ap-" + secrets.token_hex(10)


class Waiters:
    """Wake-ups for calls held in this process, at most ``limit`` at a time."""

    def __init__(self, limit: int = 1000) -> None:
        self.limit = limit
        self._events: dict[str, list[asyncio.Event]] = {}
        self._count = 0

    def register(self, approval_id: str) -> asyncio.Event | None:
        if self._count >= self.limit:
            return None
        event = asyncio.Event()
        self._events.setdefault(approval_id, []).append(event)
        self._count += 1
        return event

    def release(self, approval_id: str, event: asyncio.Event) -> None:
        events = self._events.get(approval_id, [])
        if event in events:
            events.remove(event)
            self._count -= 1
        if not events:
            self._events.pop(approval_id, None)

    def wake(self, approval_id: str) -> None:
        for event in self._events.get(approval_id, []):
            event.set()

    def wake_all(self) -> None:
        for events in self._events.values():
            for event in events:
                event.set()


async def wait_for_decision(get: Callable[[str], Any], waiters: Waiters, approval_id: str,
                            timeout_seconds: float) -> Approval | None:
    """Re-read the approval on every wake-up (and at least every POLL_SECONDS) until it is decided."""
    deadline = time.monotonic() + timeout_seconds
    event = waiters.register(approval_id)
    try:
        while True:
            if event is not None:
                event.clear()
            approval: Approval | None = await get(approval_id)
            remaining = deadline - time.monotonic()
            if approval is None or approval.effective_status(time.time()) != "pending" or remaining <= 0 or event is None:
                return approval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), min(remaining, POLL_SECONDS, max(approval.expires_at - time.time(), 0.01)))
    finally:
        if event is not None:
            waiters.release(approval_id, event)


class MemoryApprovalStore:
    """Bounded in-memory store (tests and the simplest runs); lost on restart."""

    def __init__(self, max_records: int = 10_000) -> None:
        self.max_records = max_records
        self._records: dict[str, Approval] = {}
        self._by_binding: dict[str, str] = {}  # binding key -> the newest approval made for it
        self._waiters = Waiters()

    async def create(self, approval: Approval, limits: PendingLimits | None = None) -> Approval:
        # No await from the lookup and the count to the insert: atomic on the event loop.
        newest = self._records.get(self._by_binding.get(approval.binding.key, ""))
        twin = pending_twin(newest, approval, time.time())
        if twin is not None:
            return twin
        if limits is not None:
            refuse_past_limits(limits, *self._pending_of(approval.binding))
        if len(self._records) >= self.max_records:
            oldest = min(self._records.values(), key=lambda a: a.created_at)
            del self._records[oldest.id]
            if self._by_binding.get(oldest.binding.key) == oldest.id:
                del self._by_binding[oldest.binding.key]
        self._records[approval.id] = approval
        self._by_binding[approval.binding.key] = approval.id
        return approval

    def _pending_of(self, binding: RequestBinding) -> tuple[int, int]:
        """Approvals pending in the binding's task, and of its agent."""
        now = time.time()
        of_agent = [a.binding for a in self._records.values()
                    if a.binding.agent == binding.agent and a.effective_status(now) == "pending"]
        return sum(1 for b in of_agent if b.task_id == binding.task_id), len(of_agent)

    async def for_binding(self, binding: RequestBinding) -> Approval | None:
        approval_id = self._by_binding.get(binding.key)
        return await self.get(approval_id) if approval_id is not None else None

    async def get(self, approval_id: str) -> Approval | None:
        approval = self._records.get(approval_id)
        if approval is not None:
            approval.status = approval.effective_status(time.time())
        return approval

    async def consume(self, approval_id: str) -> bool:
        approval = self._records.get(approval_id)
        return approval is not None and mark_used(approval, time.time())

    async def decide(self, approval_id: str, verdict: Verdict) -> Approval:
        stored = self._records.get(approval_id)
        if stored is None:
            raise Refusal("approval_invalid", "no such approval")
        approval = copy_of(stored)  # a refused verdict leaves the stored record as it was
        apply_verdict(approval, verdict, time.time())
        self._records[approval_id] = approval
        self._waiters.wake(approval_id)
        return approval

    async def list_pending(self, limit: int = PENDING_LIST_LIMIT) -> list[Approval]:
        now = time.time()
        pending = [a for a in self._records.values() if a.effective_status(now) == "pending"]
        return sorted(pending, key=lambda a: a.created_at)[:limit]

    async def count_pending(self) -> int:
        return len(await self.list_pending(self.max_records))

    async def wait(self, approval_id: str, timeout_seconds: float) -> Approval | None:
        return await wait_for_decision(self.get, self._waiters, approval_id, timeout_seconds)

    async def ping(self) -> tuple[bool, str]:
        return True, f"memory store ({len(self._records)} records)"

    async def close(self) -> None:
        return None
