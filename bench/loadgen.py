"""The load generator: its own process, driven by JSON jobs on stdin, one JSON result per line on stdout.

Jobs:
  seq       concurrency 1: ``count`` calls back to back on one keep-alive connection
  rate      open loop: ``rate`` calls/s for ``duration`` s, each send scheduled by the clock; latency is
            measured from the scheduled send time, so a stalled server cannot hide its queue
            (no coordinated omission); connections are added up to ``max_connections`` as needed
  closed    ``concurrency`` connections sending ``count`` calls back to back (warm-up, task history)
  inflight  open ``count`` connections, send one call on each, hold them open, then drop them all

Every call of the workload is one of a fixed mix: 70 % JSON GETs, 30 % 1 KB JSON POSTs, each inside a
task (``X-Agent-Task``) taken round-robin from the job's task list.
"""

from __future__ import annotations

import asyncio
import json
import random
import resource
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .httpclient import Connection, connect

GET_SHARE = 0.7
BODY_BYTES = 1024


def post_body(customer: int) -> bytes:
    prefix = json.dumps({"customer_id": customer, "kind": "note", "text": ""})[:-2]
    filler = "x" * (BODY_BYTES - len(prefix) - 2)
    body = (prefix + filler + '"}').encode()
    assert len(body) == BODY_BYTES
    return body


@dataclass
class Workload:
    """Builds the raw bytes of call number i for one target."""

    host: str
    port: int
    tasks: list[str]
    path_prefix: str = "/crm"
    seed: int = 1
    rng: random.Random = field(init=False)
    cursor: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.authority = f"{self.host}:{self.port}"

    def next(self) -> bytes:
        task = self.tasks[self.cursor % len(self.tasks)] if self.tasks else "none"
        self.cursor += 1
        customer = self.rng.randrange(1, 1000)
        if self.rng.random() < GET_SHARE:
            return (f"GET {self.path_prefix}/customers/{customer} HTTP/1.1\r\nHost: {self.authority}\r\n"
                    f"Accept: application/json\r\nX-Agent-Task: {task}\r\n\r\n").encode()
        body = post_body(customer)
        head = (f"POST {self.path_prefix}/customers/{customer}/notes HTTP/1.1\r\nHost: {self.authority}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nX-Agent-Task: {task}\r\n\r\n")
        return head.encode() + body


_workloads: dict[tuple[str, int, str], Workload] = {}


def workload(job: dict[str, Any]) -> Workload:
    """One per target and path, so the task round-robin carries on across jobs."""
    key = (job["host"], int(job["port"]), job.get("path_prefix", "/crm"))
    found = _workloads.get(key)
    if found is None or found.tasks != job.get("tasks", []):
        found = _workloads[key] = Workload(job["host"], int(job["port"]), list(job.get("tasks", [])),
                                           job.get("path_prefix", "/crm"), seed=int(job["port"]))
    return found


def micros(seconds: float) -> int:
    return int(seconds * 1e6)


async def run_seq(job: dict[str, Any]) -> dict[str, Any]:
    work = workload(job)
    conn = await connect(work.host, work.port)
    latencies: list[int] = []
    errors = 0
    for _ in range(int(job["count"])):
        if conn.closed:
            conn = await connect(work.host, work.port)
        raw = work.next()
        sent = time.perf_counter()
        try:
            status, done = await asyncio.wait_for(conn.request(raw), job.get("timeout", 10))
        except (ConnectionError, asyncio.TimeoutError, OSError):
            errors += 1
            conn.close()
            continue
        latencies.append(micros(done - sent))
        errors += status >= 400
    conn.close()
    return {"latencies_us": latencies, "errors": errors, "count": int(job["count"])}


@dataclass
class RateRun:
    work: Workload
    max_connections: int
    timeout: float
    idle: deque[Connection] = field(default_factory=deque)
    pending: deque[tuple[int, float]] = field(default_factory=deque)
    opened: int = 0
    peak_connections: int = 0
    latencies: list[int] = field(default_factory=list)
    errors: int = 0
    outstanding: int = 0
    last_done: float = 0.0
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    scheduling_done: bool = False
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def dispatch(self, number: int, scheduled: float) -> None:
        self.outstanding += 1
        if self.idle:
            self._spawn(self.serve(self.idle.pop(), number, scheduled))
        elif self.opened < self.max_connections:
            self.opened += 1
            self.peak_connections = max(self.peak_connections, self.opened)
            self._spawn(self.open_and_serve(number, scheduled))
        else:
            self.pending.append((number, scheduled))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def open_and_serve(self, number: int, scheduled: float) -> None:
        try:
            conn = await asyncio.wait_for(connect(self.work.host, self.work.port), self.timeout)
        except (OSError, asyncio.TimeoutError):
            self.opened -= 1
            self._complete(ok=False)
            return
        await self.serve(conn, number, scheduled)

    async def serve(self, conn: Connection, number: int, scheduled: float) -> None:
        while True:
            try:
                status, done = await asyncio.wait_for(conn.request(self.work.next()), self.timeout)
            except (ConnectionError, asyncio.TimeoutError, OSError):
                conn.close()
                self.opened -= 1
                self._complete(ok=False)
                if self.pending:
                    self.opened += 1
                    self._spawn(self.open_and_serve(*self.pending.popleft()))
                return
            self.latencies.append(micros(done - scheduled))
            self.last_done = done
            self._complete(ok=status < 400)
            if conn.closed:
                self.opened -= 1
                if self.pending:
                    self.opened += 1
                    self._spawn(self.open_and_serve(*self.pending.popleft()))
                return
            if not self.pending:
                self.idle.append(conn)
                return
            number, scheduled = self.pending.popleft()

    def _complete(self, ok: bool) -> None:
        self.errors += not ok
        self.outstanding -= 1
        if self.scheduling_done and self.outstanding == 0:
            self.finished.set()

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()


async def run_rate(job: dict[str, Any]) -> dict[str, Any]:
    rate = float(job["rate"])
    count = max(1, int(rate * float(job["duration"])))
    run = RateRun(workload(job), int(job.get("max_connections", 512)), float(job.get("timeout", 10)))
    start = time.perf_counter() + 0.02
    number = 0
    while number < count:
        due = min(count, int((time.perf_counter() - start) * rate) + 1)
        while number < due:
            run.dispatch(number, start + number / rate)
            number += 1
        await asyncio.sleep(max(0.0, start + number / rate - time.perf_counter()))
    run.scheduling_done = True
    if run.outstanding:
        await run.finished.wait()
    run.close()
    elapsed = max(run.last_done - start, 1e-9)
    return {"latencies_us": run.latencies, "errors": run.errors, "count": count, "rate": rate,
            "achieved": (count - run.errors) / elapsed, "elapsed": elapsed, "connections": run.peak_connections}


async def run_closed(job: dict[str, Any]) -> dict[str, Any]:
    work = workload(job)
    remaining = int(job["count"])
    errors = done = 0
    deadline = time.perf_counter() + float(job.get("max_seconds", 1e9))

    async def worker() -> None:
        nonlocal remaining, errors, done
        conn = await connect(work.host, work.port)
        while remaining > 0 and time.perf_counter() < deadline:
            remaining -= 1
            done += 1
            if conn.closed:
                conn = await connect(work.host, work.port)
            try:
                status, _ = await asyncio.wait_for(conn.request(work.next()), 10)
            except (ConnectionError, asyncio.TimeoutError, OSError):
                errors += 1
                conn.close()
                continue
            errors += status >= 400
        conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(int(job.get("concurrency", 8)))))
    return {"errors": errors, "count": done, "elapsed": time.perf_counter() - started}


async def run_inflight(job: dict[str, Any]) -> dict[str, Any]:
    """``count`` calls open at once on as many connections; the upstream holds each one.

    How many are open is sampled all along, while connections are still being opened too, and the
    answers are counted by status: a proxy that refuses part of the flood (503 overloaded) is not
    holding those calls, and the report says so.
    """
    work = workload(job)
    count, batch = int(job["count"]), int(job.get("batch", 250))
    conns: list[Connection] = []
    answers: list[asyncio.Future[tuple[int, float]]] = []
    connect_errors = 0
    peak_open = 0
    started = time.perf_counter()

    async def sample_open() -> None:
        nonlocal peak_open
        while True:
            peak_open = max(peak_open, sum(1 for answer in answers if not answer.done()))
            await asyncio.sleep(0.05)

    sampler = asyncio.ensure_future(sample_open())
    send_deadline = started + float(job.get("max_send_seconds", 1e9))
    for offset in range(0, count, batch):
        if time.perf_counter() > send_deadline:
            break  # a proxy that cannot accept connections fast enough: report how many got in
        size = min(batch, count - offset)
        results = await asyncio.gather(
            *(asyncio.wait_for(connect(work.host, work.port), 5) for _ in range(size)), return_exceptions=True)
        for result in results:
            if isinstance(result, Connection):
                conns.append(result)
                answers.append(asyncio.ensure_future(result.request(work.next())))
            else:
                connect_errors += 1
    sent_after = time.perf_counter() - started
    settle_until = time.perf_counter() + float(job.get("settle", 3.0))
    while time.perf_counter() < settle_until and any(not answer.done() for answer in answers):
        await asyncio.sleep(0.1)
    sampler.cancel()
    statuses: dict[str, int] = {}
    for answer in answers:
        if answer.done() and not answer.exception():
            status = str(answer.result()[0])
            statuses[status] = statuses.get(status, 0) + 1
    for conn in conns:
        conn.close()
    # A connection the proxy closed before its request was written never answers and is never lost again:
    # its waiter would wait forever. Every answer still open is abandoned here, the connections are closed.
    for answer in answers:
        answer.cancel()
    await asyncio.gather(*answers, return_exceptions=True)
    return {"sent": len(conns), "connect_errors": connect_errors, "answered_before_close": sum(statuses.values()),
            "statuses": statuses, "peak_open": peak_open, "send_seconds": sent_after}


JOBS = {"seq": run_seq, "rate": run_rate, "closed": run_closed, "inflight": run_inflight}


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for wanted in (65536, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(wanted, hard)))
            return wanted
        except (ValueError, OSError):
            continue
    return soft


async def main() -> None:
    raise_fd_limit()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"ready": True, "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}), flush=True)
    while line := await reader.readline():
        job = json.loads(line)
        try:
            result = await JOBS[job["op"]](job)
        except Exception as exc:  # noqa: BLE001 - report, do not die: the orchestrator decides
            result = {"failed": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main())
