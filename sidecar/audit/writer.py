"""Audit writes off the event loop: a bounded queue drained on a worker lane.

The event loop only stamps the event's time and puts it on the queue (a few
microseconds). A drain job on the lane (the sidecar's disk lane, shared with the task
store, or a lane of the writer's own) takes whatever is queued, chains it in queue
order, writes it as one ``write`` and then settles the callers' receipts, so
events that arrive together share one system call. ``append`` returns a
receipt at once: a future that resolves to the written event, or to None when
it could not be written. The request path awaits the receipt of an allow
decision before it forwards the call (fail closed) and ignores the receipts of
upstream results and refusals, which it queues with ``receipt=False``: then the
writer has nothing to hand back, and the event loop is not woken for them. Every
event that is not written is counted through ``on_error``. The queue is bounded twice: by
events (``queue_size``) and by the bytes of the policy input they embed (``queue_bytes``),
since an agent sizes a decision event (its body, once per element of an MCP batch) and
refusals are queued without anyone waiting for them. One drain job writes at
most MAX_BATCH events and queues the next one behind the lane's other work, so a
flood of events never holds up the task store's commits.

The writer does not wait for the next call to find out that things changed. Before
every batch, and every PROBE_SECONDS on the lane, it checks that the path still names
the file it writes (a file removed or replaced is noticed, logged, counted through
``on_displaced``, and the chain continues in a new segment: see HashChainLog); and
after a failed write it tries again every PROBE_SECONDS with an ``audit.resumed``
event that says what was lost, so readiness turns green within a second of the disk
recovering.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import orjson

from ..jsoncodec import JsonDocument, SerialisedJson
from ..lane import WorkerLane
from .chain import UNENCODABLE, AuditError, HashChainLog, now_rfc3339

log = logging.getLogger("sidecar.audit")

MAX_BATCH = 512
# The bytes of embedded documents (embedded_bytes) that may wait in the queue, unless one event alone holds more.
QUEUE_BYTES = 64 * 1024 * 1024
# A drain job stops taking events past this many bytes of policy input (the large part of a decision event,
# which an agent sizes: its body, once per element of an MCP batch), so that it never holds the lane, and
# the task store's commits behind it, for long.
DRAIN_BYTES = 4 * 1024 * 1024
PROBE_SECONDS = 0.5


# Resolves to the event as written (with seq, prev_hash, hash), or None when it was not written.
Receipt = asyncio.Future[dict[str, Any] | None]


@dataclass(slots=True)
class _Item:
    event: dict[str, Any]
    loop: asyncio.AbstractEventLoop | None = None
    waiter: Receipt | None = None
    size: int = 0  # bytes of the serialised documents it embeds (embedded_bytes)


class AuditWriter:
    def __init__(self, chain: HashChainLog, *, queue_size: int = 10_000, queue_bytes: int = QUEUE_BYTES,
                 on_error: Callable[[int], None] | None = None,
                 on_written: Callable[[list[dict[str, Any]]], None] | None = None,
                 on_displaced: Callable[[str], None] | None = None, lane: WorkerLane | None = None) -> None:
        self.chain = chain
        # SimpleQueue: a put costs a C call, not a Condition round trip; the bound is checked in _put.
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._queue_size = queue_size
        self._queue_bytes = queue_bytes
        self._queued_bytes = 0  # the sizes of the items in _queue: added by _put, taken off by _drain_batch
        self._on_error = on_error or (lambda count: None)
        self._on_written = on_written
        self._on_displaced = on_displaced or (lambda what: None)
        self.last_error: str | None = None
        self.written = 0
        self._not_written = 0  # events lost since the last successful write
        chain.on_displaced = self._displaced
        self._owns_lane = lane is None
        self._lane = lane if lane is not None else WorkerLane("audit-writer")
        self._draining = False  # a drain job is queued on the lane and has not started yet
        self._closed = False
        self._closing = threading.Lock()
        self._lane.every(PROBE_SECONDS, self._probe)

    # ------------------------------------------------------------ event loop side

    async def record(self, event: dict[str, Any]) -> dict[str, Any]:
        receipt = self.append(event)
        written = await receipt if receipt is not None else None
        if written is None:
            raise AuditError(self.last_error or "audit write failed")
        return written

    def append(self, event: dict[str, Any], *, receipt: bool = True) -> Receipt | None:
        """Queue an event; raise AuditError (already counted) when the queue is full or the writer stopped.

        Full: ``queue_size`` events, or ``queue_bytes`` of embedded documents with this one's; an event
        is always accepted when the queued events embed nothing, so that one larger than the bound is still written.

        Returns None when ``receipt`` is false or when called outside an event loop (nobody can await the outcome).
        """
        loop: asyncio.AbstractEventLoop | None = None
        if receipt:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                pass
        waiter: Receipt | None = loop.create_future() if loop is not None else None
        queued = _serialised(_stamped(event))
        self._put(_Item(queued, loop, waiter, embedded_bytes(queued)))
        return waiter

    def _put(self, item: _Item) -> None:
        # close() cannot slip in between the check and the drain's posting: its flush would miss the event, or
        # the event would be written and reported lost.
        with self._closing:
            if self._closed or not self._lane.alive:
                self._on_error(1)
                raise AuditError("audit writer is stopped")
            if self._queue.qsize() >= self._queue_size:
                self._refuse_full("queue full", "audit queue is full")
            if self._queued_bytes and self._queued_bytes + item.size > self._queue_bytes:
                self._refuse_full("queue full (bytes)", "audit queue is full (queue_bytes of policy input)")
            self._queue.put(item)
            self._queued_bytes += item.size
            if not self._draining:
                self._draining = True
                try:
                    self._lane.post(self._drain)
                except RuntimeError:  # the lane was stopped under a writer that was not closed: nothing writes it
                    self._on_error(1)
                    raise AuditError("audit writer is stopped") from None

    def _refuse_full(self, error: str, message: str) -> NoReturn:
        self._on_error(1)
        self.last_error = error
        raise AuditError(f"{message}; the sink is not keeping up")

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    @property
    def queued_bytes(self) -> int:
        """The bytes of embedded documents waiting in the queue (what ``queue_bytes`` bounds)."""
        return self._queued_bytes

    @property
    def healthy(self) -> bool:
        return self.problem() is None

    def problem(self) -> str | None:
        """Why events cannot be written right now, or None. Looks at the file itself: a probe, not a memory."""
        if self._closed or not self._lane.alive:
            return "audit writer stopped"
        if self.last_error is not None:
            return self.last_error
        displaced = self.chain.displaced()
        if displaced is not None:
            return f"audit file {displaced}; the chain continues in a new segment at the next write"
        return None

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then close the file (on the lane, behind its queued work) and stop an own lane.

        Blocking: call it off the event loop."""
        with self._closing:
            if self._closed:
                return
            self._closed = True  # appends are refused from here; what is queued is still written
        finished = threading.Event()

        def finish() -> None:
            try:
                while self._drain_batch():
                    pass
                self.chain.close()
            finally:
                finished.set()

        try:
            self._lane.post(finish)
        except RuntimeError:  # the lane was stopped first: once its thread has ended, nothing else writes the file
            if self._lane.join(timeout):
                finish()
        else:
            finished.wait(timeout)
        if self._owns_lane:
            self._lane.stop()

    # ------------------------------------------------------------ on the lane

    def _drain(self) -> None:
        self._draining = False  # before taking: an event queued from here on queues a drain of its own
        if self._closed:
            return  # close() writes what is left
        self._drain_batch()
        if not self._queue.empty() and not self._draining:
            self._draining = True  # more than one batch: the rest waits behind the lane's other work
            self._lane.post(self._drain)

    def _drain_batch(self) -> bool:
        """Write up to MAX_BATCH queued events, fewer past DRAIN_BYTES; False when none was queued."""
        batch: list[_Item] = []
        size = 0
        while len(batch) < MAX_BATCH and size < DRAIN_BYTES:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            batch.append(item)
            size += item.size
        if size:
            with self._closing:  # once a batch: _put reads and adds under it
                self._queued_bytes -= size
        if batch:
            self._write(batch)
        return bool(batch)

    def _probe(self) -> None:
        """Between writes: notice a displaced file, or try again after a failure, without waiting for a call."""
        if self._closed:
            return
        if self.last_error is not None or self.chain.displaced() is not None:
            self._write([])

    def _write(self, batch: list[_Item]) -> None:
        notices = self._resumed()
        if not batch and not notices and self.chain.displaced() is None:
            return
        try:
            written = self.chain.write_batch(notices + [item.event for item in batch])
        except Exception as exc:  # noqa: BLE001 - the thread must survive anything an event holds
            self._failed(batch, exc)
            return
        self.last_error, self._not_written = None, 0
        records = written[len(notices):]
        everything = self.chain.notices_written + written
        self.written += len(everything)
        unwritten = {i for i, (item, record) in enumerate(zip(batch, records, strict=True))
                     if record["type"] == UNENCODABLE and item.event.get("type") != UNENCODABLE}
        if unwritten:
            log.error("audit: %d events JSON cannot carry were written as %s", len(unwritten), UNENCODABLE)
            self._on_error(len(unwritten))
        self._settle(batch, [None if i in unwritten else record for i, record in enumerate(records)])
        self._consume(everything)

    def _displaced(self, what: str, notice: dict[str, Any]) -> None:
        log.error("audit file %s under the running sidecar: %s; the chain continues in a new segment after seq %s",
                  what, f"its events were copied to {notice['recovered_into']}" if notice["recovered_into"]
                  else "no events to copy", notice["continues_after_seq"])
        self._on_displaced(what)

    def _resumed(self) -> list[dict[str, Any]]:
        if self.last_error is None:
            return []
        return [{"type": "audit.resumed", "after_error": self.last_error, "events_not_written": self._not_written}]

    def _failed(self, batch: list[_Item], exc: Exception) -> None:
        error = str(exc) if isinstance(exc, AuditError) else f"audit write failed: {type(exc).__name__}"
        if batch or error != self.last_error:  # an idle retry that fails as before says nothing new
            if isinstance(exc, AuditError):
                log.error("%s (%d events not written)", exc, len(batch))
            else:
                log.exception("audit write failed")
        self.last_error = error
        self._not_written += len(batch)
        if batch:
            self._on_error(len(batch))
        self._settle(batch, [None] * len(batch))

    def _consume(self, records: list[dict[str, Any]]) -> None:
        if self._on_written is not None:
            try:
                self._on_written(records)
            except Exception:  # noqa: BLE001 - a consumer (the shipper) must not break the writer
                log.exception("audit consumer failed")

    @staticmethod
    def _settle(batch: list[_Item], outcomes: Sequence[dict[str, Any] | None]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Receipt, dict[str, Any] | None]]] = {}
        for item, outcome in zip(batch, outcomes, strict=True):
            if item.loop is not None and item.waiter is not None:
                by_loop.setdefault(item.loop, []).append((item.waiter, outcome))
        for loop, pairs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, pairs)
            except RuntimeError:
                pass  # that loop is closed: nobody waits any more


def _resolve(pairs: list[tuple[Receipt, dict[str, Any] | None]]) -> None:
    # A result, never an exception: most receipts are never awaited, and an unretrieved
    # exception would be logged as an error by asyncio.
    for waiter, outcome in pairs:
        if not waiter.done():
            waiter.set_result(outcome)


def embedded_bytes(event: dict[str, Any]) -> int:
    """About the bytes an event holds: what bounds the writer's queue and the shipper's (``queue_bytes``).

    Its documents (a decision's policy input, held as bytes: see _serialised) by their serialised size,
    its other values by theirs (an agent sizes a task's labels, a refusal's detail); keys and numbers
    are small. One document orjson cannot serialise (an integer beyond 64 bits) is sized by the
    standard library, as the chain writes it.
    """
    size = 0
    for value in event.values():
        if isinstance(value, (JsonDocument, SerialisedJson)):
            try:
                size += len(value.json)
            except TypeError:
                size += _stdlib_size(value)
        elif isinstance(value, str):
            size += len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
        elif isinstance(value, (dict, list)):
            try:
                size += len(orjson.dumps(value, default=str))
            except TypeError:
                size += _stdlib_size(value)
    return size


def _stdlib_size(value: Any) -> int:
    """The JSON size of what orjson refuses (an integer beyond 64 bits), as the standard library writes it."""
    return len(json.dumps(value, ensure_ascii=False, default=str))


def _serialised(event: dict[str, Any]) -> dict[str, Any]:
    """The event with each document it embeds held as its bytes, not as its parsed tree (see SerialisedJson)."""
    documents = {key: value for key, value in event.items() if isinstance(value, JsonDocument)}
    if not documents:
        return event
    held = dict(event)
    for key, document in documents.items():
        try:
            held[key] = SerialisedJson(document.json)
        except TypeError:  # beyond orjson (the door refuses every body that is): kept, written by the standard library
            pass
    return held


def _stamped(event: dict[str, Any]) -> dict[str, Any]:
    """The time the event happened, not the time the thread got to it."""
    return event if "timestamp" in event else {**event, "timestamp": now_rfc3339()}
