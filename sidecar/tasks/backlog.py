"""Records that could not be written after a call was forwarded, retried in the background.

A call that reached its upstream is a fact: when the task store cannot take its
record at that moment (Redis down, disk full), the write is queued here and retried
with backoff until it succeeds. The queue is bounded; past its capacity the oldest
write is dropped and counted (its reservation then expires on its own, and counts as a
completed call: see TaskSummary.settle_expired). /readyz is
red while writes wait, and the metrics show how many.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("sidecar.tasks.backlog")

BACKOFF_MIN_SECONDS = 0.1
BACKOFF_MAX_SECONDS = 5.0
ATTEMPT_TIMEOUT_SECONDS = 5.0

Write = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class PendingWrite:
    what: dict[str, Any]  # for the audit chain and logs: decision_id, task_id, record
    write: Write


@dataclass
class RecordBacklog:
    capacity: int = 10_000
    on_written: Callable[[PendingWrite], None] = lambda pending: None
    on_dropped: Callable[[PendingWrite], None] = lambda pending: None
    on_size: Callable[[int], None] = lambda size: None
    _pending: deque[PendingWrite] = field(default_factory=deque)
    _wake: asyncio.Event | None = None
    _turn: asyncio.Lock = field(default_factory=asyncio.Lock)  # one attempt at a time (the retry loop, a flush)
    last_error: str = ""

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, what: dict[str, Any], write: Write) -> None:
        if len(self._pending) >= self.capacity:
            dropped = self._pending.popleft()
            log.error("record backlog full (%d): dropped %s", self.capacity, dropped.what)
            self.on_dropped(dropped)
        self._pending.append(PendingWrite(what, write))
        self.on_size(len(self._pending))
        if self._wake is not None:
            self._wake.set()

    async def run(self) -> None:
        """Retry the oldest write until it succeeds, then the next; sleeps while nothing waits."""
        self._wake = asyncio.Event()
        backoff = BACKOFF_MIN_SECONDS
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            async with self._turn:
                written = bool(self._pending) and await self._attempt_and_remove(self._pending[0])
            if written:
                backoff = BACKOFF_MIN_SECONDS
            else:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_SECONDS)

    async def _attempt(self, pending: PendingWrite) -> bool:
        try:
            await asyncio.wait_for(pending.write(), ATTEMPT_TIMEOUT_SECONDS)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a store failure of any kind: try again later
            self.last_error = f"{type(exc).__name__}: {exc}"[:200]
            return False
        self.on_written(pending)
        return True

    async def flush(self, deadline_seconds: float) -> None:
        """On stop: one more attempt at every waiting write, within a deadline (what fails is logged)."""
        try:
            await asyncio.wait_for(self._flush_once(), deadline_seconds)
        except asyncio.TimeoutError:
            pass
        if self._pending:
            log.error("stopping with %d records of forwarded calls not written: %s", len(self._pending),
                      [pending.what for pending in self._pending][:20])

    async def _flush_once(self) -> None:
        async with self._turn:
            for pending in list(self._pending):
                await self._attempt_and_remove(pending)

    async def _attempt_and_remove(self, pending: PendingWrite) -> bool:
        if not await self._attempt(pending):
            return False
        self._pending = deque(p for p in self._pending if p is not pending)
        self.on_size(len(self._pending))
        return True

    async def ready(self) -> tuple[bool, str]:
        if self._pending:
            return False, f"{len(self._pending)} records of forwarded calls wait for the task store ({self.last_error})"
        return True, "every forwarded call is recorded"
