"""Per-task turns: in one sidecar, the calls of a task are decided one at a time.

A call takes its task's turn to read the history, decide and reserve, and gives it
back before anything slow (an approval wait, the upstream call). Calls of different
tasks never wait for each other. A task's lock exists only while a call holds or
waits for it, so the map is bounded by the calls in flight.

The turn only saves work: across replicas the reservation is a compare-and-set on
the history's version, and that is what keeps the totals right.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class _Turn:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class TaskTurns:
    def __init__(self) -> None:
        self._turns: dict[str, _Turn] = {}

    def __len__(self) -> int:
        return len(self._turns)

    @asynccontextmanager
    async def turn(self, task_id: str) -> AsyncIterator[None]:
        entry = self._turns.get(task_id)
        if entry is None:
            entry = self._turns[task_id] = _Turn()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._turns[task_id]
