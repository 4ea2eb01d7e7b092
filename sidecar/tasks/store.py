"""The task store protocol and the in-memory implementation (bounded)."""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

RECENT_CALLS = 20


def iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


@dataclass(frozen=True)
class CallRecord:
    """One call as the task history remembers it."""

    route: str
    method: str
    path: str
    host: str
    outcome: str
    at: str
    amount: float = 0.0
    records: float = 0.0
    classification: str | None = None
    external: bool = False
    write: bool = False


@dataclass
class TaskSummary:
    calls: int = 0
    by_route: dict[str, int] = field(default_factory=dict)
    by_method: dict[str, int] = field(default_factory=dict)
    totals: dict[str, float] = field(default_factory=lambda: {"amount": 0.0, "records": 0.0})
    external_hosts_written: list[str] = field(default_factory=list)
    classifications_read: list[str] = field(default_factory=list)
    recent: deque[CallRecord] = field(default_factory=lambda: deque(maxlen=RECENT_CALLS))

    def add(self, record: CallRecord) -> None:
        self.calls += 1
        self.by_route[record.route] = self.by_route.get(record.route, 0) + 1
        self.by_method[record.method] = self.by_method.get(record.method, 0) + 1
        if record.outcome == "allow":
            self.totals["amount"] = self.totals.get("amount", 0.0) + record.amount
            self.totals["records"] = self.totals.get("records", 0.0) + record.records
        if record.external and record.write and record.host not in self.external_hosts_written and len(self.external_hosts_written) < 50:
            self.external_hosts_written.append(record.host)
        if record.classification and not record.write and record.classification not in self.classifications_read:
            self.classifications_read.append(record.classification)
        self.recent.append(record)

    def as_input(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "by_route": dict(self.by_route),
            "by_method": dict(self.by_method),
            "totals": dict(self.totals),
            "external_hosts_written": list(self.external_hosts_written),
            "classifications_read": list(self.classifications_read),
            "recent": [
                {"route": r.route, "method": r.method, "path": r.path, "host": r.host, "outcome": r.outcome, "at": r.at}
                for r in self.recent
            ],
        }


@dataclass
class Task:
    id: str
    agent: str
    intent: str
    labels: dict[str, Any]
    created_at: float
    expires_at: float
    status: str = "open"  # open | completed | revoked
    allowed_tools: list[str] = field(default_factory=list)

    def active(self, now: float) -> bool:
        return self.status == "open" and now < self.expires_at

    def as_input(self, summary: TaskSummary) -> dict[str, Any]:
        return {
            "id": self.id,
            "intent": self.intent,
            "labels": dict(self.labels),
            "allowed_tools": list(self.allowed_tools),
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "expires_at_epoch": int(self.expires_at),
            "status": self.status,
            "history": summary.as_input(),
        }

    def public(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["created_at"], doc["expires_at"] = iso(self.created_at), iso(self.expires_at)
        return doc


class TaskStore(Protocol):
    async def create(self, *, agent: str, intent: str, labels: dict[str, Any], ttl_seconds: int,
                     allowed_tools: list[str]) -> Task: ...

    async def get(self, task_id: str) -> tuple[Task, TaskSummary] | None: ...

    async def record(self, task_id: str, record: CallRecord) -> None: ...

    async def finish(self, task_id: str, status: str) -> Task | None: ...


class MemoryTaskStore:
    """Live tasks in memory, at most ``max_tasks`` (expired first, then oldest evicted)."""

    def __init__(self, max_tasks: int = 10_000) -> None:
        self.max_tasks = max_tasks
        self._tasks: OrderedDict[str, tuple[Task, TaskSummary]] = OrderedDict()

    async def create(self, *, agent: str, intent: str, labels: dict[str, Any], ttl_seconds: int,
                     allowed_tools: list[str]) -> Task:
        now = time.time()
        task = Task(id="t-" + secrets.token_hex(8), agent=agent, intent=intent, labels=labels,
                    created_at=now, expires_at=now + ttl_seconds, allowed_tools=allowed_tools)
        self._evict(now)
        self._tasks[task.id] = (task, TaskSummary())
        return task

    def _evict(self, now: float) -> None:
        for task_id in [k for k, (t, _) in self._tasks.items() if now >= t.expires_at][:1000]:
            del self._tasks[task_id]
        while len(self._tasks) >= self.max_tasks:
            self._tasks.popitem(last=False)

    async def get(self, task_id: str) -> tuple[Task, TaskSummary] | None:
        return self._tasks.get(task_id)

    async def record(self, task_id: str, record: CallRecord) -> None:
        entry = self._tasks.get(task_id)
        if entry is not None:
            entry[1].add(record)

    async def finish(self, task_id: str, status: str) -> Task | None:
        entry = self._tasks.get(task_id)
        if entry is None:
            return None
        entry[0].status = status
        return entry[0]
