"""JSON round trips for Task and TaskSummary, shared by the SQLite and Redis stores.

Generic over the dataclass fields so a field added to TaskSummary (JSON-native
types) is persisted without touching this file; only ``recent``, ``recent_allowed`` and
``in_flight`` (the reservations) need help.
"""

from __future__ import annotations

import json
import sys
from collections import deque
from dataclasses import asdict, fields
from typing import Any

import orjson

from .store import RECENT_CALLS, CallRecord, Reservation, Task, TaskSummary, epoch_ms


def _dumps(doc: dict[str, Any]) -> str:
    """Compact JSON; orjson (a history is written on every call), the standard library for what orjson refuses."""
    try:
        return orjson.dumps(doc).decode()
    except TypeError:  # an integer beyond 64 bits in a measure's total
        return json.dumps(doc, separators=(",", ":"))


def task_to_json(task: Task) -> str:
    return _dumps(asdict(task))


def task_from_json(text: str | bytes) -> Task:
    doc: dict[str, Any] = orjson.loads(text)
    known = {f.name for f in fields(Task)}
    return Task(**{k: v for k, v in doc.items() if k in known})


# Computed once: dataclasses.fields() and asdict() cost tens of microseconds per call on the hot path,
# and every field holds JSON-native values already, so a shallow view serialises the same document.
_SUMMARY_FIELDS = tuple(f.name for f in fields(TaskSummary))
_RECORD_FIELDS = frozenset(f.name for f in fields(CallRecord))
# The short strings a history repeats in every record (issue 17): decoded, each record held copies of its own,
# 20 records of a task 20 copies of the same route, method, host, outcome. Interned, the records share one.
# (Measure names, totals and counts are keys, which orjson's key cache shares already.)
_SHARED_STRINGS = frozenset({"route", "method", "host", "outcome", "classification", "tool"})
_intern = sys.intern


def summary_to_json(summary: TaskSummary, *, in_flight: bool = True) -> str:
    """``in_flight=False`` leaves the reservations (and the version) to a store that keeps them apart (Redis)."""
    doc: dict[str, Any] = {name: getattr(summary, name) for name in _SUMMARY_FIELDS}
    doc["recent"] = [vars(record) for record in summary.recent]
    # Stored once: only the allowed calls no longer in ``recent`` are written apart (and only when there are some).
    del doc["recent_allowed"]
    in_recent = {id(record) for record in summary.recent}
    before = [vars(record) for record in summary.recent_allowed if id(record) not in in_recent]
    if before:
        doc["allowed_before"] = before
    if in_flight:
        doc["in_flight"] = [reservation_doc(r) for r in summary.in_flight.values()]
    else:
        del doc["in_flight"], doc["version"]
    return _dumps(doc)


def summary_from_json(text: str | bytes) -> TaskSummary:
    doc: dict[str, Any] = orjson.loads(text)
    summary = TaskSummary()
    for field in fields(TaskSummary):
        if field.name not in doc:
            continue  # a field added after this summary was stored keeps its default
        if field.name == "recent":
            # Sorted: a history stored before recent was kept by decision time is in the order calls settled.
            records = sorted((_record(r) for r in doc["recent"]), key=lambda record: epoch_ms(record.at))
            summary.recent = deque(records, maxlen=RECENT_CALLS)
            allowed = [_record(r) for r in doc.get("allowed_before", ())]
            allowed += [record for record in records if record.outcome == "allow"]
            allowed.sort(key=lambda record: epoch_ms(record.at))
            summary.recent_allowed = deque(allowed, maxlen=RECENT_CALLS)
        elif field.name == "in_flight":
            reservations = (reservation_from_doc(r) for r in doc["in_flight"])
            summary.in_flight = {r.id: r for r in reservations}
        else:
            setattr(summary, field.name, doc[field.name])
    for values in (summary.external_hosts_written, summary.classifications_read):
        if type(values) is list:
            values[:] = [_intern(value) if value.__class__ is str else value for value in values]
    return summary


def _record(doc: dict[str, Any]) -> CallRecord:
    known: dict[str, Any] = {k: (_intern(v) if k in _SHARED_STRINGS and v.__class__ is str else v)
                             for k, v in doc.items() if k in _RECORD_FIELDS}
    return CallRecord(**known)


def reservation_doc(reservation: Reservation) -> dict[str, Any]:
    return {"id": reservation.id, "expires_at": reservation.expires_at, "record": vars(reservation.record)}


def reservation_to_json(reservation: Reservation) -> str:
    return _dumps(reservation_doc(reservation))


def reservation_from_doc(doc: dict[str, Any]) -> Reservation:
    return Reservation(id=str(doc["id"]), record=_record(doc["record"]), expires_at=float(doc["expires_at"]))


def reservation_from_json(text: str | bytes) -> Reservation:
    return reservation_from_doc(orjson.loads(text))
