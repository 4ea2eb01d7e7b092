"""JSON round trips for Task and TaskSummary, shared by the SQLite and Redis stores.

Generic over the dataclass fields so a field added to TaskSummary (JSON-native
types) is persisted without touching this file; only ``recent`` needs help.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import asdict, fields
from typing import Any

from .store import RECENT_CALLS, CallRecord, Task, TaskSummary


def task_to_json(task: Task) -> str:
    return json.dumps(asdict(task), separators=(",", ":"))


def task_from_json(text: str | bytes) -> Task:
    doc: dict[str, Any] = json.loads(text)
    known = {f.name for f in fields(Task)}
    return Task(**{k: v for k, v in doc.items() if k in known})


# Computed once: dataclasses.fields() and asdict() cost tens of microseconds per call on the hot path,
# and every field holds JSON-native values already, so a shallow view serialises the same document.
_SUMMARY_FIELDS = tuple(f.name for f in fields(TaskSummary))
_RECORD_FIELDS = frozenset(f.name for f in fields(CallRecord))


def summary_to_json(summary: TaskSummary) -> str:
    doc: dict[str, Any] = {name: getattr(summary, name) for name in _SUMMARY_FIELDS}
    doc["recent"] = [vars(record) for record in summary.recent]
    return json.dumps(doc, separators=(",", ":"))


def summary_from_json(text: str | bytes) -> TaskSummary:
    doc: dict[str, Any] = json.loads(text)
    summary = TaskSummary()
    record_fields = _RECORD_FIELDS
    for field in fields(TaskSummary):
        if field.name not in doc:
            continue  # a field added after this summary was stored keeps its default
        if field.name == "recent":
            records = (CallRecord(**{k: v for k, v in r.items() if k in record_fields}) for r in doc["recent"])
            summary.recent = deque(records, maxlen=RECENT_CALLS)
        else:
            setattr(summary, field.name, doc[field.name])
    return summary
