"""Shipping audit events to an HTTP sink in OPA's decision-log upload format."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web

from approvals_support import eventually
from harness import SidecarFactory
from harness import free_port
from sidecar.audit.chain import GENESIS, event_hash
from sidecar.audit.ship import AuditShipper, encode_upload
from sidecar.config import AuditShipConfig
from sidecar.jsoncodec import JsonDocument
from sidecar.observability.metrics import Metrics


class DecisionLogSink:
    """A receiver of OPA decision logs: `POST /logs` with a gzipped JSON array. Fails the first uploads on purpose."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts = 0
        self.events: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/logs", self.upload)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def upload(self, request: web.Request) -> web.Response:
        self.attempts += 1
        self.headers.append(dict(request.headers))
        if self.attempts <= self.failures:
            return web.Response(status=503, text="not now")
        # aiohttp inflates the body as Content-Encoding says: a body that is not gzip fails here.
        events = json.loads(await request.read())
        assert isinstance(events, list)
        self.events.extend(events)
        return web.Response(status=204)

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()


async def test_events_reach_the_sink_in_opa_upload_format_and_still_verify(make_sidecar: SidecarFactory,
                                                                          tmp_path: Path) -> None:
    sink = DecisionLogSink(failures=2)
    await sink.start()
    token_file = tmp_path / "ship-token"
    token_file.write_text("ship-bearer-0123456789\n")
    try:
        sc = await make_sidecar(audit={"ship": {
            "url": f"http://127.0.0.1:{sink.port}", "interval_seconds": 0.05, "backoff_min_seconds": 0.05,
            "backoff_max_seconds": 0.2, "bearer_token_file": str(token_file)}})
        async with httpx.AsyncClient() as agent:
            for n in range(5):
                assert (await agent.get(f"{sc.proxy}/crm/customers/{n}")).status_code == 200
            assert (await agent.post(f"{sc.proxy}/crm/customers", json={})).status_code == 403

        async def all_shipped() -> bool:
            return len(sink.events) >= 11  # 5 x (decision + upstream) + 1 denied decision

        await eventually(all_shipped, what="11 events at the sink")
        async with httpx.AsyncClient() as client:
            metrics = (await client.get(f"{sc.metrics}/metrics")).text
    finally:
        await sink.stop()

    assert sink.attempts >= 3  # two refused uploads, retried with backoff
    last = sink.headers[-1]
    assert last["Content-Encoding"] == "gzip" and last["Content-Type"] == "application/json"
    assert last["Authorization"] == "Bearer ship-bearer-0123456789"

    events = sink.events
    assert [e["seq"] for e in events] == list(range(len(events)))  # requeued in order, none lost, none twice
    assert events[0]["prev_hash"] == GENESIS
    for previous, event in zip([None, *events], events):
        assert event_hash(event) == event["hash"]
        if previous is not None:
            assert event["prev_hash"] == previous["hash"]
    decision = next(e for e in events if e["type"] == "decision")
    for field in ("decision_id", "path", "input", "result", "timestamp", "metrics"):  # OPA decision-log fields
        assert field in decision
    assert decision["path"] == "sidecar/authz/decision"
    on_disk = [json.loads(line) for line in sc.audit_path.read_text().splitlines()]
    assert events == on_disk[: len(events)]

    assert 'agent_sidecar_audit_ship_failures_total 2.0' in metrics
    assert f'agent_sidecar_audit_shipped_events_total {float(len(events))}' in metrics


def test_a_full_shipping_queue_drops_the_oldest_and_counts_them() -> None:
    metrics = Metrics()
    shipper = AuditShipper(AuditShipConfig(url="http://127.0.0.1:9", queue_size=3, max_batch=2), metrics)
    shipper.offer([{"seq": n} for n in range(5)])
    assert shipper.dropped == 2 and shipper.depth == 3
    assert [e["seq"] for e in shipper._take()] == [2, 3]
    shipper._requeue([{"seq": 2}, {"seq": 3}])
    shipper.offer([{"seq": 5}])
    assert shipper.dropped == 3
    assert [e["seq"] for e in shipper._take()] == [3, 4]
    assert metrics.audit_ship_dropped._value.get() == 3


def test_the_shipping_queue_drops_the_oldest_past_queue_bytes_and_counts_them() -> None:
    """While the sink is down the queue fills: with request bodies in the events, bytes bound it before the count."""
    metrics = Metrics()
    document = JsonDocument({"request": {"body": "x" * 10_000}})
    size = len(document.json)
    shipper = AuditShipper(AuditShipConfig(url="http://127.0.0.1:9", queue_bytes=3 * size, max_batch=2), metrics)
    shipper.offer([{"seq": n, "input": document} for n in range(5)])
    assert shipper.dropped == 2 and shipper.depth == 3 and shipper.queued_bytes == 3 * size
    taken = shipper._take()
    assert [e["seq"] for e in taken] == [2, 3] and shipper.queued_bytes == size
    shipper.offer([{"seq": 5, "input": document}, {"seq": 6, "input": document}])  # the upload of 2, 3 is under way
    shipper._requeue(taken)  # it failed: back at the head, and the oldest go
    assert shipper.dropped == 4 and shipper.queued_bytes == 3 * size
    assert [e["seq"] for e in shipper._take()] == [4, 5]
    shipper.offer([{"seq": n} for n in range(7, 10)])  # events that embed nothing are bounded by queue_size alone
    assert shipper.dropped == 4 and shipper.depth == 4
    assert [e["seq"] for e in shipper._take() + shipper._take()] == [6, 7, 8, 9] and shipper.queued_bytes == 0
    assert metrics.audit_ship_dropped._value.get() == 4


def test_one_event_larger_than_the_shipping_queue_bytes_is_kept_alone() -> None:
    large = JsonDocument({"request": {"body": "x" * 10_000}})
    shipper = AuditShipper(AuditShipConfig(url="http://127.0.0.1:9", queue_bytes=1024, max_batch=10))
    shipper.offer([{"seq": 0}, {"seq": 1, "input": large}])
    assert shipper.dropped == 1 and [e["seq"] for e in shipper._take()] == [1]
    shipper._requeue([{"seq": 1, "input": large}])
    shipper.offer([{"seq": 2, "input": large}])
    assert shipper.dropped == 2 and [e["seq"] for e in shipper._take()] == [2] and shipper.queued_bytes == 0


def test_the_upload_body_is_a_gzipped_json_array_of_the_events_as_chained() -> None:
    events = [{"seq": 0, "decision_id": "d-1", "prev_hash": GENESIS, "hash": "h", "input": {"ü": 1}}]
    assert json.loads(gzip.decompress(encode_upload(events))) == events
