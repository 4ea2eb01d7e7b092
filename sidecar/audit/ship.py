"""Ship audit events to an HTTP sink in OPA's decision-log upload format.

A service that already receives OPA decision logs receives ours: each upload is
a gzipped JSON array of events POSTed to ``url + resource`` (OPA's default
resource is ``/logs``) with ``Content-Type: application/json`` and
``Content-Encoding: gzip``. Events are shipped exactly as they were chained
(``seq``, ``prev_hash`` and ``hash`` kept) so the receiver can verify them.
A non-2xx answer or a network error puts the batch back at the head of the
queue and waits with exponential backoff. The queue is bounded by events
(``queue_size``) and by the bytes of policy input they embed (``queue_bytes``,
the part an agent sizes); past either the oldest events are dropped and counted.
One event larger than ``queue_bytes`` is kept when it is the only one.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import threading
from collections import deque
from typing import Any

import aiohttp

from ..config import AuditShipConfig
from ..observability.metrics import Metrics
from ..jsoncodec import stdlib_default
from ..secret import Secret
from .writer import embedded_bytes

log = logging.getLogger("sidecar.audit.ship")


def endpoint(settings: AuditShipConfig) -> str:
    return settings.url.rstrip("/") + settings.resource


def encode_upload(events: list[dict[str, Any]]) -> bytes:
    """OPA's upload body: a gzipped JSON array."""
    return gzip.compress(json.dumps(events, separators=(",", ":"), ensure_ascii=False, default=stdlib_default).encode(),
                         compresslevel=5)


class AuditShipper:
    def __init__(self, settings: AuditShipConfig, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self._lock = threading.Lock()  # offer() runs on the audit writer thread
        self._queue: deque[tuple[dict[str, Any], int]] = deque()  # each event with its embedded_bytes
        self._bytes = 0  # the sum of the sizes in _queue
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._backoff = settings.backoff_min_seconds
        self.dropped = 0
        self.shipped = 0

    # ------------------------------------------------------------ any thread

    def offer(self, events: list[dict[str, Any]]) -> None:
        sized = [(event, embedded_bytes(event)) for event in events]
        with self._lock:
            self._queue.extend(sized)
            self._bytes += sum(size for _, size in sized)
            overflow = self._trim()
            depth = len(self._queue)
        if overflow:
            self._count_dropped(overflow)
        if depth >= self.settings.max_batch and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:
                pass

    @property
    def depth(self) -> int:
        with self._lock:
            return len(self._queue)

    @property
    def queued_bytes(self) -> int:
        """The bytes of embedded documents in the queue (what ``queue_bytes`` bounds)."""
        with self._lock:
            return self._bytes

    def _trim(self) -> int:
        """Drop the oldest events past queue_size or queue_bytes (keeping one, however large); how many. Under _lock."""
        dropped = 0
        while len(self._queue) > self.settings.queue_size or (
                self._bytes > self.settings.queue_bytes and len(self._queue) > 1):
            _, size = self._queue.popleft()
            self._bytes -= size
            dropped += 1
        return dropped

    def _count_dropped(self, count: int) -> None:
        self.dropped += count
        log.warning("audit shipping queue full: dropped %d oldest events", count)
        if self.metrics is not None:
            self.metrics.audit_ship_dropped.inc(count)

    def _take(self) -> list[dict[str, Any]]:
        with self._lock:
            count = min(len(self._queue), self.settings.max_batch)
            taken = [self._queue.popleft() for _ in range(count)]
            self._bytes -= sum(size for _, size in taken)
        return [event for event, _ in taken]

    def _requeue(self, batch: list[dict[str, Any]]) -> None:
        sized = [(event, embedded_bytes(event)) for event in batch]
        with self._lock:
            self._queue.extendleft(reversed(sized))
            self._bytes += sum(size for _, size in sized)
            overflow = self._trim()
        if overflow:
            self._count_dropped(overflow)

    # ------------------------------------------------------------ event loop

    async def run(self) -> None:
        """Ship until cancelled; on cancellation try once more, briefly, to ship what is left."""
        self._loop = asyncio.get_running_loop()
        try:
            await self._ship_forever()
        except asyncio.CancelledError:
            await self._final_flush()
            raise

    async def _final_flush(self, timeout: float = 2.0) -> None:
        if not self.depth:
            return
        try:
            async with self._session() as session:
                await asyncio.wait_for(self._ship_once(session), timeout)
        except (asyncio.TimeoutError, aiohttp.ClientError, OSError):
            pass
        if self.depth:
            log.warning("audit shipping: %d events left unshipped at shutdown (they stay in the audit files)", self.depth)

    def _session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.settings.timeout_seconds))

    async def _ship_forever(self) -> None:
        async with self._session() as session:
            while True:
                await self._pause(self.settings.interval_seconds)
                while self.depth:
                    if not await self._ship_once(session):
                        await self._pause(self._backoff)
                        self._backoff = min(self._backoff * 2, self.settings.backoff_max_seconds)
                        break
                    self._backoff = self.settings.backoff_min_seconds

    async def _pause(self, seconds: float) -> None:
        """Wait for the interval or an early wake (a full batch)."""
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except asyncio.TimeoutError:
            pass
        self._wake.clear()

    async def _ship_once(self, session: aiohttp.ClientSession) -> bool:
        batch = self._take()
        if not batch:
            return True
        body = await asyncio.to_thread(encode_upload, batch)  # JSON and gzip of a large batch: off the loop
        try:
            headers = await asyncio.to_thread(self._headers)
            async with session.post(endpoint(self.settings), data=body, headers=headers) as response:
                await response.read()
                ok = 200 <= response.status < 300
                failure = f"HTTP {response.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            ok, failure = False, type(exc).__name__
        if ok:
            self.shipped += len(batch)
            if self.metrics is not None:
                self.metrics.audit_shipped.inc(len(batch))
            return True
        self._requeue(batch)
        log.warning("audit shipping to %s failed (%s); %d events requeued, retry in %.1fs",
                    endpoint(self.settings), failure, len(batch), self._backoff)
        if self.metrics is not None:
            self.metrics.audit_ship_failures.inc()
        return False

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        token_file = self.settings.bearer_token_file
        if token_file is not None:
            token = Secret(token_file.read_text(encoding="utf-8").strip())
            headers["Authorization"] = f"Bearer {token.reveal()}"
        return headers
