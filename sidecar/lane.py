"""One thread that runs submitted work in submission order, for the parts that own a blocking file.

The sidecar runs one such lane for its disk (``disk-writer``): the task store's commits and the
audit chain's writes share it. Two threads woke, took the GIL and woke the event loop for every
call; one does both with fewer of each (docs/performance.md). Each embedded engine has a lane too.

``run_in_executor`` on a one-worker ThreadPoolExecutor does the same, but pays for a
concurrent Future, its condition variable and a chained asyncio Future on every
call: about 45 µs of CPU a round trip here, against about 28 µs for this lane. The
request path makes one or two such round trips per call.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger("sidecar.lane")

Outcome = tuple[bool, Any]  # (True, the work's result) or (False, the exception it raised)
_Job = tuple[Callable[[], Any], "asyncio.AbstractEventLoop | None", "Callable[[Outcome], None] | None"]


@dataclass
class _Periodic:
    seconds: float
    work: Callable[[], None]
    due: float


class WorkerLane:
    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._periodic: list[_Periodic] = []  # touched by the lane's thread only
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Work queued now will run."""
        return not self._stopped and self._thread.is_alive()

    def every(self, seconds: float, work: Callable[[], None]) -> None:
        """Run ``work`` on this lane about every ``seconds``, between jobs (never during one)."""
        self.post(lambda: self._periodic.append(_Periodic(seconds, work, time.monotonic() + seconds)))

    def submit(self, work: Callable[[], T]) -> asyncio.Future[T]:
        """Queue ``work``; the future resolves on the calling loop with its result or its exception."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self.report(work, functools.partial(_settle, future))
        return future

    def report(self, work: Callable[[], Any], on_done: Callable[[Outcome], None]) -> None:
        """Queue ``work``; ``on_done(outcome)`` then runs on the calling loop, whether or not anyone still waits
        (an evaluation that outlived its caller must still hand its engine back)."""
        if not self.alive:
            raise RuntimeError("the worker lane is stopped")
        self._jobs.put((work, asyncio.get_running_loop(), on_done))

    def post(self, work: Callable[[], None]) -> None:
        """Queue ``work`` with nobody waiting for it: it reports back itself (``call_soon_threadsafe``), which
        saves the future and the loop turn its callbacks would take (group commit settles many futures at once)."""
        if not self.alive:
            raise RuntimeError("the worker lane is stopped")
        self._jobs.put((work, None, None))

    def stop(self) -> None:
        """Let queued work finish, then end the thread (without waiting for it); nothing is queued after."""
        self._stopped = True
        self._jobs.put(None)

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the thread has ended (after stop()); True if it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=self._until_due())
            except queue.Empty:
                self._run_due()
                continue
            if job is None:
                return
            self._run_job(job)
            del job
            if self._periodic:
                self._run_due()

    def _until_due(self) -> float | None:
        if not self._periodic:
            return None
        return max(0.0, min(p.due for p in self._periodic) - time.monotonic())

    def _run_due(self) -> None:
        now = time.monotonic()
        for periodic in self._periodic:
            if periodic.due <= now:
                periodic.due = now + periodic.seconds
                self._run_posted(periodic.work)

    def _run_posted(self, work: Callable[[], None]) -> None:
        try:
            work()  # posted: reports back on its own
        except Exception:  # noqa: BLE001 - the lane outlives a bad job; its poster hears nothing
            log.exception("a job posted to the %s lane failed", self._thread.name)

    def _run_job(self, job: _Job) -> None:
        work, loop, on_done = job
        if loop is None or on_done is None:
            self._run_posted(work)
            return
        try:
            outcome: Outcome = (True, work())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, like an executor would
            outcome = (False, exc)
        del job, work  # nothing from this job outlives it on this thread
        try:
            loop.call_soon_threadsafe(on_done, outcome)
        except RuntimeError:
            pass  # that loop is closed: nobody waits any more


def _settle(future: asyncio.Future[Any], outcome: Outcome) -> None:
    if future.done():  # the caller was cancelled
        return
    ok, value = outcome
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)
