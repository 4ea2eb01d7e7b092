"""The task store protocol and the in-memory implementation (bounded)."""

from __future__ import annotations

import calendar
import functools
import heapq
import math
import secrets
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from typing import Any, Protocol

from ..problems import Refusal

RECENT_CALLS = 20
# Agent-chosen keys (methods, MCP tool names, measure names) past this many are counted under "other".
MAX_KEYS = 32
# Calls of one task allowed and not yet answered; past this many a call of the task is refused (task_contended).
MAX_IN_FLIGHT_PER_TASK = 256
# Reservations confirmed or released lately, remembered so that a retried write never counts a call twice.
SETTLED_KEPT = 64


def iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def iso_ms(epoch: float) -> str:
    """RFC 3339 with milliseconds: the rate window must not see a call up to a second older than it is."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch * 1000) % 1000:03d}Z"


@functools.lru_cache(maxsize=8192)
def epoch_ms(at: str) -> int:
    """RFC 3339 (``iso_ms``'s form, UTC with or without milliseconds) to Unix milliseconds, exactly; 0 (never
    inside a rate window) for anything else, as v1's rules ignored a timestamp they could not parse."""
    try:
        moment = datetime.fromisoformat(at)
    except ValueError:
        return 0
    if moment.utcoffset() is None:
        return 0
    return (calendar.timegm(moment.utctimetuple()) * 1000) + moment.microsecond // 1000


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
    measures: dict[str, float] = field(default_factory=dict)  # route-configured; amount/records win over the fields above
    tool: str | None = None  # the MCP tool called, if any
    # Whether the call may return its route's data (joins classifications_read when forwarded); None, as in
    # records stored before it existed: a call reads unless it writes.
    reads: bool | None = None

    def __post_init__(self) -> None:
        # A measure beyond a double (1e308 + 1e308 from an MCP batch) is stored as JSON null, which would make
        # every later read of its task fail: it saturates at the largest float, over every cap, as totals do.
        object.__setattr__(self, "amount", _saturated(self.amount))
        object.__setattr__(self, "records", _saturated(self.records))
        if any(not _finite(value) for value in self.measures.values()):
            object.__setattr__(self, "measures", {name: _saturated(value) for name, value in self.measures.items()})

    def measure_values(self) -> dict[str, float]:
        return {"amount": self.amount, "records": self.records, **self.measures}


def _finite(value: Any) -> bool:
    try:
        return isinstance(value, (int, float)) and math.isfinite(value)
    except OverflowError:  # an integer beyond a double
        return False


def _saturated(value: Any) -> float:
    """A measure as a finite number: beyond a double, or null as such a value was stored, is the largest float."""
    if _finite(value):
        return value  # type: ignore[no-any-return]
    if isinstance(value, (int, float)) and value < 0:
        return -sys.float_info.max
    return sys.float_info.max


@dataclass(frozen=True)
class Reservation:
    """What an allowed call adds to its task, counted from its decision until the upstream answers.

    Confirmed (the record joins the completed history) when the upstream answers; released when
    the call is refused after its decision or never reached its upstream; counted as a completed
    call once expired (TaskSummary.settle_expired), so a sidecar killed mid-call leaves no task
    stuck and gives no budget back.
    """

    id: str  # the decision id
    record: CallRecord
    expires_at: float  # epoch seconds

    def live(self, now: float) -> bool:
        return now < self.expires_at


def _count(counts: dict[str, Any], key: str, value: float) -> None:
    key = key if key in counts or len(counts) < MAX_KEYS else "other"
    total = counts.get(key, 0) + value
    # Two finite amounts can sum to infinity (1e308 + 1e308), which JSON cannot carry (orjson writes null,
    # and a null total would slip past a cap): a total saturates at the largest float, over every cap.
    # (Not measures.saturated_sum: a count of calls stays an integer.)
    counts[key] = total if math.isfinite(total) else sys.float_info.max


@dataclass
class TaskSummary:
    """A task's history: the completed calls (counts, totals, the last calls) and the calls in flight.

    ``version`` grows with every change that can make a decision stricter: a call added (reserved,
    or recorded as held or denied) or the task ended. A reservation is accepted only on the version
    its decision read (compare-and-set). Confirming or releasing a reservation does not change the
    version: neither adds anything a decision did not already count.
    """

    calls: int = 0
    by_route: dict[str, int] = field(default_factory=dict)
    by_method: dict[str, int] = field(default_factory=dict)
    by_tool: dict[str, int] = field(default_factory=dict)
    totals: dict[str, float] = field(default_factory=lambda: {"amount": 0.0, "records": 0.0})
    external_hosts_written: list[str] = field(default_factory=list)
    classifications_read: list[str] = field(default_factory=list)
    recent: deque[CallRecord] = field(default_factory=lambda: deque(maxlen=RECENT_CALLS))
    # The latest allowed calls, which the rate counts, kept apart: in ``recent`` alone, held and denied calls
    # mixed in would push allowed ones out of the rate window. The same records as in ``recent`` where both.
    recent_allowed: deque[CallRecord] = field(default_factory=lambda: deque(maxlen=RECENT_CALLS))
    version: int = 0
    in_flight: dict[str, Reservation] = field(default_factory=dict)
    settled: list[str] = field(default_factory=list)  # ids of the last SETTLED_KEPT reservations confirmed or released

    def add(self, record: CallRecord) -> None:
        """A new call that is complete as recorded (held, denied, or allowed and answered)."""
        self._count_call(record)
        self.version += 1

    def reserve(self, reservation: Reservation) -> None:
        self.in_flight[reservation.id] = reservation
        self.version += 1

    def confirm(self, reservation: Reservation) -> bool:
        """The upstream answered: the reserved call joins the completed history (even if its reservation expired).
        False when it was settled already (a retried write)."""
        # Counted only while it is still reserved here: settled (confirmed, released, or counted on its expiry)
        # it is gone from in_flight, however many other calls were settled since (``settled`` is a window).
        if self.in_flight.pop(reservation.id, None) is None:
            return False
        self.count_settled(reservation)
        return True

    def count_settled(self, reservation: Reservation) -> None:
        """Count a reservation held apart from this summary (Redis: its in-flight hash) as a completed call."""
        self._count_call(reservation.record)
        self._settle(reservation.id)

    def release(self, reservation_id: str) -> bool:
        if reservation_id in self.settled:
            return False
        self._settle(reservation_id)
        return self.in_flight.pop(reservation_id, None) is not None

    def _settle(self, reservation_id: str) -> None:
        self.settled.append(reservation_id)
        del self.settled[:-SETTLED_KEPT]

    def settle_expired(self, now: float) -> list[Reservation]:
        """Count the expired reservations as completed calls (fail closed: each may have reached its upstream).

        A reservation outlives its expiry when its sidecar died mid-call, its confirmation could not be
        written, or its call outlived the route's bound (an answer streamed for longer). Dropping it would
        let the task's next calls ignore a call that was allowed and may have acted. A confirmation
        that arrives later finds it settled and does not count it again."""
        expired = [r for r in self.in_flight.values() if not r.live(now)]
        for reservation in expired:
            self.confirm(reservation)
        return expired

    def reservations(self) -> list[Reservation]:
        """Every unsettled reservation, live or expired, oldest decision first."""
        return sorted(self.in_flight.values(), key=lambda r: r.record.at)

    def _count_call(self, record: CallRecord) -> None:
        self.calls += 1
        self.by_route[record.route] = self.by_route.get(record.route, 0) + 1
        _count(self.by_method, record.method, 1)
        if record.tool is not None:
            _count(self.by_tool, record.tool, 1)
        if record.outcome == "allow":
            for name, value in record.measure_values().items():
                _count(self.totals, name, value)
        # Only forwarded calls wrote or read anything; held and denied ones did not.
        forwarded = record.outcome == "allow"
        if forwarded and record.external and record.write and record.host not in self.external_hosts_written and len(self.external_hosts_written) < 50:
            self.external_hosts_written.append(record.host)
        reads = record.reads if record.reads is not None else not record.write
        if forwarded and record.classification and reads and record.classification not in self.classifications_read:
            self.classifications_read.append(record.classification)
        _keep_latest(self.recent, record)
        if forwarded:
            _keep_latest(self.recent_allowed, record)

    def as_input(self, now: float | None = None) -> dict[str, Any]:
        """The history as the admin API shows it: completed calls and live reservations counted alike, the
        reservations also apart under ``in_flight`` and marked ``state: reserved`` in ``recent``."""
        return self._history(now, _recent_objects)

    def as_policy_input(self, now: float | None = None) -> dict[str, Any]:
        """The history a decision sees (input v2, docs/policy.md): as ``as_input``, with ``recent`` reduced to
        how many calls it holds and, per outcome, when each was decided in Unix milliseconds, oldest first."""
        return self._history(now, _recent_times)

    def _history(self, now: float | None,
                 recent_form: Callable[[list[tuple[CallRecord, str]], list[CallRecord]], Any]) -> dict[str, Any]:
        now = time.time() if now is None else now
        reserved = self.reservations()
        live = [r for r in reserved if r.live(now)]  # an expired one counts as completed: see settle_expired
        view = self._with_reserved(reserved) if reserved else self
        in_flight_totals: dict[str, float] = {}
        for reservation in live:
            for name, value in reservation.record.measure_values().items():
                _count(in_flight_totals, name, value)
        return {
            "calls": view.calls,
            "by_route": dict(view.by_route),
            "by_method": dict(view.by_method),
            "by_tool": dict(view.by_tool),
            "totals": dict(view.totals),
            "external_hosts_written": list(view.external_hosts_written),
            "classifications_read": list(view.classifications_read),
            "recent": recent_form(self._recent_with(reserved, now), self._allowed_with(reserved)),
            "in_flight": {"calls": len(live), "totals": in_flight_totals},
        }

    def _recent_with(self, reserved: list[Reservation], now: float) -> list[tuple[CallRecord, str]]:
        """The last calls, oldest first by decision time (a slow call is confirmed after faster later ones)."""
        entries = [(r, "completed") for r in self.recent]
        entries += [(r.record, "reserved" if r.live(now) else "completed") for r in reserved]
        entries.sort(key=lambda entry: epoch_ms(entry[0].at))
        return entries[-RECENT_CALLS:]

    def _allowed_with(self, reserved: list[Reservation]) -> list[CallRecord]:
        """The latest allowed calls, reservations included (each is an allowed call), oldest first."""
        if not reserved:
            return list(self.recent_allowed)
        entries = [*self.recent_allowed, *(r.record for r in reserved)]
        entries.sort(key=lambda record: epoch_ms(record.at))
        return entries[-RECENT_CALLS:]

    def _with_reserved(self, reserved: list[Reservation]) -> TaskSummary:
        """A copy with the reservations counted as calls (``recent`` aside: see _recent_with)."""
        view = TaskSummary(calls=self.calls, by_route=dict(self.by_route), by_method=dict(self.by_method),
                           by_tool=dict(self.by_tool), totals=dict(self.totals),
                           external_hosts_written=list(self.external_hosts_written),
                           classifications_read=list(self.classifications_read))
        for reservation in reserved:
            view._count_call(reservation.record)
        return view


def _keep_latest(recent: deque[CallRecord], record: CallRecord) -> None:
    """Keep the RECENT_CALLS latest calls by decision time, oldest first. A slow call is counted when it
    settles, after later ones: appended, it would push a later call out of the rate window in its place."""
    at = epoch_ms(record.at)
    if len(recent) == recent.maxlen:
        if at < epoch_ms(recent[0].at):
            return  # older than every call kept: not among the latest
        recent.popleft()
    position = len(recent)
    while position and epoch_ms(recent[position - 1].at) > at:
        position -= 1
    recent.insert(position, record)


def _recent_objects(entries: list[tuple[CallRecord, str]], allowed: list[CallRecord]) -> list[dict[str, Any]]:
    return [{"route": r.route, "method": r.method, "path": r.path, "host": r.host, "outcome": r.outcome, "at": r.at,
             "state": state} for r, state in entries]


def _recent_times(entries: list[tuple[CallRecord, str]], allowed: list[CallRecord]) -> dict[str, Any]:
    """The last calls' count and, per outcome, their times; ``allow`` from the latest allowed calls, however
    many held or denied calls came between (the rate counts allowed calls)."""
    at_ms: dict[str, list[int]] = {}
    for record, _ in entries:
        if record.outcome != "allow":
            at_ms.setdefault(record.outcome, []).append(epoch_ms(record.at))
    if allowed:
        at_ms["allow"] = [epoch_ms(record.at) for record in allowed]
    return {"calls": len(entries), "at_ms": at_ms}


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
        return self._document(summary.as_input())

    def as_policy_input(self, summary: TaskSummary) -> dict[str, Any]:
        """The task as the policy input's ``task`` (input v2)."""
        return self._document(summary.as_policy_input())

    def _document(self, history: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.id,
            "intent": self.intent,
            "labels": dict(self.labels),
            "allowed_tools": list(self.allowed_tools),
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "expires_at_epoch": int(self.expires_at),
            "status": self.status,
            "history": history,
        }

    def public(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["created_at"], doc["expires_at"] = iso(self.created_at), iso(self.expires_at)
        return doc


@dataclass(frozen=True)
class CredentialState:
    """What the store knows about one minted credential (by jti). Never the token itself."""

    jti: str
    task_id: str | None
    expires_at: int
    revoked: bool = False
    cause: str | None = None


ENDED = ("completed", "revoked")


class TaskStore(Protocol):
    async def create(self, *, agent: str, intent: str, labels: dict[str, Any], ttl_seconds: int,
                     allowed_tools: list[str]) -> Task: ...

    async def get(self, task_id: str) -> tuple[Task, TaskSummary] | None:
        """The task and its history, reservations in flight included (with the history's version)."""
        ...

    async def record(self, task_id: str, record: CallRecord) -> None:
        """Add a call complete as it is (held or denied): it counts at once."""
        ...

    async def reserve(self, task_id: str, reservation: Reservation, *, version: int, wait: bool = True) -> bool:
        """Add an allowed call's reservation if the history is still at ``version`` (the one its decision read);
        False if it changed meanwhile (decide again). Refuse ``task_contended`` past MAX_IN_FLIGHT_PER_TASK.

        Durable when it returns, unless ``wait=False``: then a store may answer once the reservation counts
        for the task's next decision, and the caller awaits ``committed`` before forwarding the call."""
        ...

    async def committed(self, reservation_id: str) -> None:
        """Until a reservation made with ``wait=False`` is durable; store_unavailable (and the reservation
        released) if it could not be written."""
        ...

    async def confirm(self, task_id: str, reservation: Reservation) -> None:
        """The upstream answered: the reserved call becomes completed history."""
        ...

    async def release(self, task_id: str, reservation_id: str) -> None:
        """The call never reached the upstream (or failed there): its reservation goes."""
        ...

    async def finish(self, task_id: str, status: str) -> Task | None:
        """End an open task (status completed or revoked) and revoke every credential issued for it."""
        ...

    async def record_credential(self, jti: str, task_id: str | None, expires_at: int) -> None:
        """Remember a minted credential, before it is forwarded, so introspection and revocation know it."""
        ...

    async def credential(self, jti: str) -> CredentialState | None: ...

    async def close(self) -> None: ...


def new_task(*, agent: str, intent: str, labels: dict[str, Any], ttl_seconds: int, allowed_tools: list[str]) -> Task:
    now = time.time()
    return Task(id="t-" + secrets.token_hex(8), agent=agent, intent=intent, labels=labels,
                created_at=now, expires_at=now + ttl_seconds, allowed_tools=allowed_tools)


def reserve_in(summary: TaskSummary, reservation: Reservation, version: int) -> bool:
    """Compare-and-set for the stores that hold the summary in this process (memory, SQLite)."""
    if summary.version != version:
        return False
    summary.settle_expired(time.time())
    check_room_in_flight(len(summary.in_flight))
    summary.reserve(reservation)
    return True


def check_room_in_flight(count: int) -> None:
    if count >= MAX_IN_FLIGHT_PER_TASK:
        raise Refusal("task_contended", f"{count} calls of this task are in flight (limit {MAX_IN_FLIGHT_PER_TASK})",
                      headers={"Retry-After": "1"})


def check_end_status(status: str) -> None:
    if status not in ENDED:
        raise ValueError(f"a task ends as one of {', '.join(ENDED)}, not {status!r}")


class MemoryTaskStore:
    """Live tasks in memory, at most ``max_tasks`` (expired first, then oldest evicted)."""

    def __init__(self, max_tasks: int = 10_000, max_credentials: int = 100_000) -> None:
        self.max_tasks = max_tasks
        self.max_credentials = max_credentials
        self._tasks: OrderedDict[str, tuple[Task, TaskSummary]] = OrderedDict()
        self._credentials: OrderedDict[str, CredentialState] = OrderedDict()
        self._expiries: list[tuple[float, str]] = []  # a heap: expired tasks are found without a scan

    async def create(self, *, agent: str, intent: str, labels: dict[str, Any], ttl_seconds: int,
                     allowed_tools: list[str]) -> Task:
        task = new_task(agent=agent, intent=intent, labels=labels, ttl_seconds=ttl_seconds, allowed_tools=allowed_tools)
        self._evict(task.created_at)
        self._tasks[task.id] = (task, TaskSummary())
        heapq.heappush(self._expiries, (task.expires_at, task.id))
        return task

    def _evict(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] <= now:
            self._tasks.pop(heapq.heappop(self._expiries)[1], None)
        while len(self._tasks) >= self.max_tasks:
            self._tasks.popitem(last=False)
        if len(self._expiries) > 2 * self.max_tasks:  # entries of tasks evicted as oldest
            self._expiries = [(t.expires_at, k) for k, (t, _) in self._tasks.items()]
            heapq.heapify(self._expiries)

    def __len__(self) -> int:
        return len(self._tasks)

    async def get(self, task_id: str) -> tuple[Task, TaskSummary] | None:
        return self._tasks.get(task_id)

    async def record(self, task_id: str, record: CallRecord) -> None:
        entry = self._tasks.get(task_id)
        if entry is not None:
            entry[1].add(record)

    async def reserve(self, task_id: str, reservation: Reservation, *, version: int, wait: bool = True) -> bool:
        entry = self._tasks.get(task_id)
        if entry is None:
            return False
        return reserve_in(entry[1], reservation, version)

    async def committed(self, reservation_id: str) -> None:
        return None

    async def confirm(self, task_id: str, reservation: Reservation) -> None:
        entry = self._tasks.get(task_id)
        if entry is not None:
            entry[1].confirm(reservation)

    async def release(self, task_id: str, reservation_id: str) -> None:
        entry = self._tasks.get(task_id)
        if entry is not None:
            entry[1].release(reservation_id)

    async def finish(self, task_id: str, status: str) -> Task | None:
        check_end_status(status)
        entry = self._tasks.get(task_id)
        if entry is None:
            return None
        if entry[0].status == "open":
            entry[0].status = status
            entry[1].version += 1  # a decision that read the task open must not reserve on it now
        for jti, state in self._credentials.items():
            if state.task_id == task_id and not state.revoked:
                self._credentials[jti] = replace(state, revoked=True, cause=status)
        return entry[0]

    async def record_credential(self, jti: str, task_id: str | None, expires_at: int) -> None:
        now = time.time()
        while self._credentials and len(self._credentials) >= self.max_credentials:
            self._credentials.popitem(last=False)  # oldest first: memory is bounded, use SQLite to keep them
        while self._credentials and next(iter(self._credentials.values())).expires_at < now:
            self._credentials.popitem(last=False)  # short TTLs: the oldest expire first
        self._credentials[jti] = CredentialState(jti, task_id, expires_at)

    async def credential(self, jti: str) -> CredentialState | None:
        return self._credentials.get(jti)

    async def close(self) -> None:
        return None
