"""Records that could not be written after a call was forwarded, retried in the background.

A call that reached its upstream is a fact: when the task store cannot take its
record at that moment (Redis down, disk full), the write is queued here and retried
with backoff until it succeeds. The queue is bounded; past its capacity the oldest
write is dropped and counted (its reservation then expires on its own). /readyz is
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
            if await self._attempt(self._pending[0]):
                self._pending.popleft()
                self.on_size(len(self._pending))
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

    async def ready(self) -> tuple[bool, str]:
        if self._pending:
            return False, f"{len(self._pending)} records of forwarded calls wait for the task store ({self.last_error})"
        return True, "every forwarded call is recorded"
