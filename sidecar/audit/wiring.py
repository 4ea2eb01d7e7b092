"""Build the audit parts from the config: the chain, its writer thread, the optional shipper."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from ..config import Config, ConfigError
from ..lane import WorkerLane
from ..observability.metrics import Metrics
from .chain import AuditError, HashChainLog
from .ship import AuditShipper
from .writer import AuditWriter


@dataclass
class AuditParts:
    writer: AuditWriter
    shipper: AuditShipper | None

    async def ready(self) -> tuple[bool, str]:
        """Readiness: the writer runs, its last write (or its retry) succeeded, and the path still names its file."""
        problem = await asyncio.to_thread(self.writer.problem)  # a stat of the audit path: never on the loop
        if problem is not None:
            return False, problem
        return True, f"{self.writer.chain.path.name}: next seq {self.writer.chain.next_seq}"

    @property
    def background(self) -> list[Callable[[], Coroutine[Any, Any, None]]]:
        return [self.shipper.run] if self.shipper is not None else []


def build_audit(config: Config, metrics: Metrics, disk: WorkerLane | None = None) -> AuditParts:
    """``disk``: the lane the chain is written on (shared with the task store); without one, a lane of its own."""
    try:
        chain = HashChainLog(config.audit_path, chain_id=chain_id(), rotate_bytes=config.audit.rotate_bytes)
    except (OSError, AuditError) as exc:
        raise ConfigError(f"{config.source.name}: audit.path: {getattr(exc, 'strerror', None) or exc}") from None
    shipper = AuditShipper(config.audit.ship, metrics) if config.audit.ship is not None else None
    writer = AuditWriter(
        chain,
        queue_size=config.audit.queue_size,
        queue_bytes=config.audit.queue_bytes,
        on_error=metrics.audit_write_errors.inc,
        on_written=_consumer(metrics, shipper),
        on_displaced=lambda what: metrics.audit_file_displaced.labels(what).inc(),
        lane=disk,
    )
    metrics.audit_queue.set_function(lambda: writer.depth)
    metrics.audit_queue_bytes.set_function(lambda: writer.queued_bytes)
    if shipper is not None:
        metrics.audit_ship_queue.set_function(lambda: shipper.depth)
        metrics.audit_ship_queue_bytes.set_function(lambda: shipper.queued_bytes)
    return AuditParts(writer, shipper)


def chain_id() -> str:
    """Names this sidecar's chain in every event, so a receiver of many sidecars can tell the chains apart."""
    return os.environ.get("POD_NAME") or socket.gethostname() or "sidecar"


def _consumer(metrics: Metrics, shipper: AuditShipper | None) -> Callable[[list[dict[str, Any]]], None]:
    def written(records: list[dict[str, Any]]) -> None:
        metrics.audit_events.inc(len(records))
        if shipper is not None:
            shipper.offer(records)

    return written
