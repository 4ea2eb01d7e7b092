"""``recent`` read back from a store is trusted to be in decision-time order.

_keep_latest (37c4b93) assumes the deque is sorted: it drops a call older than ``recent[0]`` and evicts
``recent[0]`` as the oldest. The codec loads ``recent`` in the stored order, and every history the
previous version stored (SQLite, Redis) is in *settle* order, the very order 37c4b93 fixed: slow calls
confirmed after faster later ones sit at the end. After an upgrade each new call evicts a later call and
keeps the stale older ones, so the rate window reads an older time at the cap's index than the task's
real calls and lets calls past the cap, until the stale entries age out.
"""

from __future__ import annotations

from collections import deque

from sidecar.tasks.codec import summary_from_json, summary_to_json
from sidecar.tasks.store import RECENT_CALLS, CallRecord, TaskSummary, epoch_ms


def call(second: int) -> CallRecord:
    return CallRecord(route="crm", method="GET", path="/customers/42", host="crm.internal", outcome="allow",
                      at=f"2025-01-01T00:00:{second:02d}.000Z")


def test_a_history_stored_in_settle_order_keeps_the_latest_calls_after_an_upgrade() -> None:
    # As the previous version stored it: 15 fast calls decided :06-:20, then 5 slow calls decided :01-:05
    # that were confirmed after them (appended when they settled).
    stored = TaskSummary(calls=20)
    stored.recent = deque([call(s) for s in range(6, 21)] + [call(s) for s in range(1, 6)], maxlen=RECENT_CALLS)
    summary = summary_from_json(summary_to_json(stored))
    summary.add(call(21))
    summary.add(call(22))
    kept = summary.as_policy_input(now=1.9e9)["recent"]["at_ms"]["allow"]
    expected = [epoch_ms(call(s).at) for s in range(3, 23)]  # the 20 latest by decision time
    assert kept == expected
