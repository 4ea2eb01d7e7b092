"""The audit chain on disk: verify, tampering, missing events, rotation, restarts, the writer thread."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from sidecar.audit import AuditError, AuditWriter, HashChainLog, chain_files, verify_files
from sidecar.audit.writer import DRAIN_BYTES, MAX_BATCH, embedded_bytes
from sidecar.jsoncodec import JsonDocument
from sidecar.lane import WorkerLane
from sidecar.audit.chain import GENESIS, event_hash, now_rfc3339, rotated_files, rotated_name
from sidecar.cli import main

CLI = [sys.executable, "-m", "sidecar"]


def write_events(path: Path, count: int, **options: Any) -> list[dict[str, Any]]:
    log = HashChainLog(path, **options)
    try:
        return [log.append({"type": "decision", "decision_id": f"d-{n}", "task_id": "t-1", "reasons": ["x" * 200]})
                for n in range(count)]
    finally:
        log.close()


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def verify(*paths: Path | str, partial: bool = False) -> subprocess.CompletedProcess[str]:
    extra = ["--partial"] if partial else []
    return subprocess.run([*CLI, "audit", "verify", *extra, *map(str, paths)], capture_output=True, text=True, timeout=60)


def test_verify_reports_the_count_of_verified_events(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    records = write_events(path, 5)
    assert records[0]["prev_hash"] == GENESIS and records[0]["seq"] == 0
    assert all(b["prev_hash"] == a["hash"] for a, b in zip(records, records[1:]))
    result = verify(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok: 5 events verified" in result.stdout


def test_a_tampered_line_fails_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_events(path, 5)
    content = lines(path)
    event = json.loads(content[2])
    event["reasons"] = ["nothing to see here"]
    content[2] = json.dumps(event)
    path.write_text("\n".join(content) + "\n")
    result = verify(path)
    assert result.returncode == 1
    assert f"{path}:3: event was altered" in result.stdout
    assert "BROKEN after 2 verified events" in result.stdout


def test_a_deleted_line_is_a_broken_link(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_events(path, 5)
    content = lines(path)
    del content[2]
    path.write_text("\n".join(content) + "\n")
    result = verify(path)
    assert result.returncode == 1
    assert f"{path}:3: broken link" in result.stdout and "expected seq 2, found seq 3" in result.stdout


def test_a_deleted_first_line_is_a_missing_start(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_events(path, 3)
    path.write_text("\n".join(lines(path)[1:]) + "\n")
    result = verify(path)
    assert result.returncode == 1 and "the chain does not start here" in result.stdout
    assert verify(path, partial=True).returncode == 0


def test_a_recomputed_hash_still_breaks_the_next_link(tmp_path: Path) -> None:
    """An attacker who rewrites an event and fixes its own hash still breaks the link after it."""
    path = tmp_path / "audit.jsonl"
    write_events(path, 4)
    content = lines(path)
    event = json.loads(content[1])
    event["task_id"] = "t-other"
    event["hash"] = event_hash(event)
    content[1] = json.dumps(event)
    path.write_text("\n".join(content) + "\n")
    result = verify(path)
    assert result.returncode == 1 and f"{path}:3: broken link" in result.stdout


def test_rotation_by_size_forms_one_chain_across_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    records = write_events(path, 60, rotate_bytes=4096)
    rotated = rotated_files(path)
    assert len(rotated) >= 3
    assert [p.name for p in rotated][:2] == ["audit.000001.jsonl", "audit.000002.jsonl"]
    assert all(p.stat().st_size <= 4096 for p in rotated)
    first_of_second = json.loads(lines(rotated[1])[0])
    last_of_first = json.loads(lines(rotated[0])[-1])
    assert first_of_second["prev_hash"] == last_of_first["hash"]

    files = chain_files(path)
    result = verify(*files)
    assert result.returncode == 0 and f"ok: 60 events verified in {len(files)} file(s)" in result.stdout
    assert verify(tmp_path).returncode == 0  # a directory stands for its chain, oldest first
    assert verify_files(files).last_hash == records[-1]["hash"]

    alone = verify(path)  # the active file alone is the tail of the chain
    assert alone.returncode == 1 and "an earlier file is missing" in alone.stdout
    assert verify(path, partial=True).returncode == 0
    missing_middle = verify(rotated[0], *rotated[2:], path)
    assert missing_middle.returncode == 1 and f"{rotated[2]}:1: broken link" in missing_middle.stdout


def test_a_restart_continues_the_chain_even_right_after_a_rotation(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    first = write_events(path, 10, rotate_bytes=4096)
    path.rename(rotated_name(path, len(rotated_files(path)) + 1))  # stopped right after rotating: no active file
    second = write_events(path, 3, rotate_bytes=4096)
    assert second[0]["seq"] == 10 and second[0]["prev_hash"] == first[-1]["hash"]
    result = verify_files(chain_files(path))
    assert result.ok and result.events == 13, result.problem


def test_a_failed_write_leaves_no_half_line_and_the_chain_stays_whole(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = HashChainLog(path)
    log.append({"type": "a"})
    path.unlink()
    path.mkdir()  # the file is gone and cannot be recreated: EISDIR even for root
    with pytest.raises(AuditError):
        log.append({"type": "lost"})
    path.rmdir()
    log.append({"type": "b"})
    log.close()
    segment, event = [json.loads(line) for line in lines(path)]
    assert segment["type"] == "audit.segment_started" and segment["recovered_into"] == "audit.000001.jsonl"
    assert event["type"] == "b" and event["seq"] == 2  # linked to "a" through the segment event, not to the lost event
    result = verify_files(chain_files(path))  # "a" was kept from the deleted file: the whole chain verifies
    assert result.ok and result.events == 3, result.problem


def test_verify_via_main_prints_the_last_hash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.jsonl"
    records = write_events(path, 2)
    assert main(["audit", "verify", str(path)]) == 0
    assert records[-1]["hash"] in capsys.readouterr().out
    assert main(["audit", "verify", str(tmp_path / "missing.jsonl")]) == 1


async def test_the_writer_thread_chains_concurrent_events_in_queue_order(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    errors: list[int] = []
    written: list[dict[str, Any]] = []
    writer = AuditWriter(HashChainLog(path), on_error=errors.append, on_written=written.extend)
    try:
        receipts = [writer.append({"type": "call", "n": n}) for n in range(300)]
        results = await asyncio.gather(*[r for r in receipts if r is not None])
        recorded = await writer.record({"type": "last"})
    finally:
        writer.close()
    assert [r["n"] for r in results if r] == list(range(300))
    assert recorded["seq"] == 300 and errors == []
    assert [e["seq"] for e in written] == list(range(301))
    assert verify_files([path]).events == 301


async def test_the_writer_counts_and_reports_what_it_could_not_write(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    errors: list[int] = []
    writer = AuditWriter(HashChainLog(path), on_error=errors.append)
    try:
        await writer.record({"type": "a"})
        path.unlink()
        path.mkdir()
        receipt = writer.append({"type": "lost"})
        assert receipt is not None and await receipt is None
        with pytest.raises(AuditError):
            await writer.record({"type": "lost too"})
        assert not writer.healthy and sum(errors) == 2
        path.rmdir()
        await writer.record({"type": "b"})
        assert writer.healthy
    finally:
        writer.close()


def test_a_flood_of_events_does_not_hold_up_the_other_work_of_a_shared_lane(tmp_path: Path) -> None:
    """The task store commits on the same lane: a drain writes one batch, then waits its turn again."""
    lane = WorkerLane("disk")
    writer = AuditWriter(HashChainLog(tmp_path / "audit.jsonl"), lane=lane)
    written_when_the_other_job_ran: list[int] = []
    other_job_ran = threading.Event()

    def other_job() -> None:  # what a task-store commit would be
        written_when_the_other_job_ran.append(writer.written)
        other_job_ran.set()

    try:
        writer.append({"type": "first"}, receipt=False)
        lane.post(other_job)
        for n in range(3 * MAX_BATCH):
            writer.append({"type": "flood", "n": n}, receipt=False)
        assert other_job_ran.wait(10)
    finally:
        writer.close()  # writes what is still queued
        lane.stop()
    assert written_when_the_other_job_ran[0] <= MAX_BATCH
    assert verify_files([tmp_path / "audit.jsonl"]).events == 3 * MAX_BATCH + 1
    with pytest.raises(AuditError):
        writer.append({"type": "after close"})


def test_large_events_take_turns_with_the_other_work_of_a_shared_lane(tmp_path: Path) -> None:
    """An agent sizes a decision event (its body is in the policy input): a drain stops past DRAIN_BYTES."""
    lane = WorkerLane("disk")
    writer = AuditWriter(HashChainLog(tmp_path / "audit.jsonl"), lane=lane)
    large = JsonDocument({"request": {"body": "x" * (1024 * 1024)}})
    written_when_the_other_job_ran: list[int] = []

    def other_job() -> None:
        written_when_the_other_job_ran.append(writer.written)

    try:
        writer.append({"type": "decision", "input": large}, receipt=False)
        lane.post(other_job)
        for _ in range(20):
            writer.append({"type": "decision", "input": large}, receipt=False)
    finally:
        writer.close()
        lane.stop()
    assert written_when_the_other_job_ran[0] <= DRAIN_BYTES // (1024 * 1024) + 1
    assert verify_files([tmp_path / "audit.jsonl"]).events == 21


def test_an_event_appended_while_the_writer_closes_is_written_or_refused_and_counted(tmp_path: Path) -> None:
    """Real concurrent appends and close(): no event is accepted and then lost without a count."""
    for attempt in range(20):
        path = tmp_path / f"audit{attempt}.jsonl"
        errors: list[int] = []
        writer = AuditWriter(HashChainLog(path), on_error=errors.append)
        outcomes = {"accepted": 0, "refused": 0}
        started = threading.Event()

        def append_until_refused() -> None:
            while True:
                try:
                    writer.append({"type": "call"}, receipt=False)
                except AuditError:
                    outcomes["refused"] += 1
                    return
                outcomes["accepted"] += 1
                started.set()

        appender = threading.Thread(target=append_until_refused)
        appender.start()
        assert started.wait(10)
        writer.close(timeout=30)
        appender.join(10)
        assert verify_files([path]).events == outcomes["accepted"]
        assert sum(errors) == outcomes["refused"] == 1


def test_a_writer_closed_after_its_shared_lane_stopped_still_writes_what_it_accepted(tmp_path: Path) -> None:
    lane = WorkerLane("disk")
    writer = AuditWriter(HashChainLog(tmp_path / "audit.jsonl"), lane=lane)
    for n in range(5):
        writer.append({"type": "call", "n": n}, receipt=False)
    lane.stop()
    writer.close()
    assert verify_files([tmp_path / "audit.jsonl"]).events == 5


def test_a_full_queue_is_refused_at_once_and_counted(tmp_path: Path) -> None:
    errors: list[int] = []
    writer = AuditWriter(HashChainLog(tmp_path / "audit.jsonl"), queue_size=1, on_error=errors.append)
    writer.close()  # the thread is gone: nothing drains the queue
    with pytest.raises(AuditError):
        writer.append({"type": "x"})
    assert errors == [1]


def blocked_lane() -> tuple[WorkerLane, threading.Event]:
    """A lane whose thread waits, until the returned event is set, behind a job that is already running."""
    lane = WorkerLane("disk")
    running, release = threading.Event(), threading.Event()

    def block() -> None:
        running.set()
        release.wait(30)

    lane.post(block)
    assert running.wait(10)
    return lane, release


async def test_the_queue_is_bounded_by_the_bytes_of_policy_input_it_holds(tmp_path: Path) -> None:
    """Refusals are queued with nobody waiting and an agent sizes their input: bytes, not only events, are bounded."""
    path = tmp_path / "audit.jsonl"
    document = JsonDocument({"request": {"body": "x" * 100_000}})
    # The document, the type's name and the time it is stamped with (a fixed width).
    size = embedded_bytes({"type": "decision", "n": 0, "input": document, "timestamp": now_rfc3339()})
    assert len(document.json) < size < len(document.json) + 64
    errors: list[int] = []
    lane, release = blocked_lane()
    writer = AuditWriter(HashChainLog(path), queue_bytes=3 * size, on_error=errors.append, lane=lane)
    try:
        receipts = [writer.append({"type": "decision", "n": n, "input": document}) for n in range(3)]
        assert writer.queued_bytes == 3 * size and writer.depth == 3
        with pytest.raises(AuditError):
            writer.append({"type": "decision", "n": 3, "input": document}, receipt=False)
        assert errors == [1] and writer.last_error is not None and not writer.healthy
        assert writer.queued_bytes == 3 * size and writer.depth == 3  # the refused event holds nothing
        release.set()
        assert [r and r["n"] for r in await asyncio.gather(*[r for r in receipts if r is not None])] == [0, 1, 2]
        assert writer.queued_bytes == 0
        receipts = [writer.append({"type": "decision", "n": n, "input": document}) for n in range(3, 6)]
        assert all(await asyncio.gather(*[r for r in receipts if r is not None]))
        assert writer.queued_bytes == 0 and writer.healthy and errors == [1]

        # A failed write takes its events' bytes off the queue as a written one does.
        path.unlink()
        path.mkdir()
        receipt = writer.append({"type": "decision", "n": 6, "input": document})
        assert receipt is not None and await receipt is None
        assert errors == [1, 1] and writer.queued_bytes == 0
        path.rmdir()
        assert (await writer.record({"type": "decision", "n": 7, "input": document}))["n"] == 7
        assert writer.queued_bytes == 0
    finally:
        release.set()
        writer.close()
        lane.stop()
    assert writer.queued_bytes == 0
    assert verify_files(chain_files(path)).ok
    written = [json.loads(line) for file in chain_files(path) for line in lines(file)]
    assert [e["n"] for e in written if e["type"] == "decision"] == [0, 1, 2, 3, 4, 5, 7]


async def test_one_event_larger_than_the_byte_bound_is_accepted_into_an_empty_queue(tmp_path: Path) -> None:
    document = JsonDocument({"request": {"body": "x" * 100_000}})
    errors: list[int] = []
    lane, release = blocked_lane()
    writer = AuditWriter(HashChainLog(tmp_path / "audit.jsonl"), queue_bytes=1024, on_error=errors.append, lane=lane)
    try:
        receipt = writer.append({"type": "decision", "input": document})
        assert writer.queued_bytes == embedded_bytes({"type": "decision", "input": document, "timestamp": now_rfc3339()})
        with pytest.raises(AuditError):  # one is queued: the next is past the bound
            writer.append({"type": "decision", "input": document}, receipt=False)
        release.set()
        assert receipt is not None and (await receipt) is not None
        assert (await writer.record({"type": "decision", "input": document}))["type"] == "decision"
    finally:
        release.set()
        writer.close()
        lane.stop()
    assert errors == [1] and writer.queued_bytes == 0
    written = [json.loads(line) for line in lines(tmp_path / "audit.jsonl")]
    assert [e["type"] for e in written] == ["audit.resumed", "decision", "decision"]  # the chain says the queue was full
    assert written[0]["after_error"] == "queue full (bytes)"


@pytest.mark.parametrize(("audit", "message"), [
    ({"rotate_bytes": 100}, "sidecar.yaml: audit.rotate_bytes: must be 0 (never rotate) or at least 4096"),
    ({"queue_size": 0}, "sidecar.yaml: audit.queue_size: must be a positive integer"),
    ({"queue_bytes": 0}, "sidecar.yaml: audit.queue_bytes: must be a positive integer"),
    ({"ship": {"url": "http://logs", "queue_bytes": 0}}, "sidecar.yaml: audit.ship.queue_bytes: must be a positive integer"),
    ({"ship": {"interval_seconds": 1}}, "sidecar.yaml: audit.ship.url: is required"),
    ({"ship": {"url": "ftp://logs"}}, "sidecar.yaml: audit.ship.url: not an http(s) URL"),
    ({"ship": {"url": "http://logs", "resource": "logs"}}, "sidecar.yaml: audit.ship.resource: must be a path starting with /"),
    ({"ship": {"url": "http://logs", "backoff_min_seconds": 5, "backoff_max_seconds": 1}},
     "sidecar.yaml: audit.ship.backoff_max_seconds: must not be less than backoff_min_seconds"),
    ({"ship": {"url": "http://logs", "queue": 1}}, "sidecar.yaml: audit.ship.queue: unknown key"),
])
def test_audit_config_errors_name_the_key(tmp_path: Path, audit: dict[str, Any], message: str) -> None:
    from harness import sidecar_config
    from sidecar.config import ConfigError, parse_config

    config = sidecar_config(tmp_path, "http://127.0.0.1:1", audit=audit)
    with pytest.raises(ConfigError) as error:
        parse_config(config, tmp_path / "sidecar.yaml")
    assert str(error.value) == message


def test_audit_config_defaults_and_ship_section(tmp_path: Path) -> None:
    from harness import sidecar_config
    from sidecar.config import parse_config

    config = parse_config(sidecar_config(tmp_path, "http://127.0.0.1:1", audit={"ship": {"url": "https://logs.example/"}}),
                          tmp_path / "sidecar.yaml")
    assert config.audit.fail_closed and config.audit.rotate_bytes == 64 * 1024 * 1024
    assert config.audit.ship is not None and config.audit.ship.url == "https://logs.example"
    assert config.audit.ship.resource == "/logs"
    assert config.audit.queue_bytes == config.audit.ship.queue_bytes == 64 * 1024 * 1024
    config = parse_config(sidecar_config(tmp_path, "http://127.0.0.1:1", audit={
        "queue_bytes": 1000, "ship": {"url": "https://logs.example/", "queue_bytes": 2000}}), tmp_path / "sidecar.yaml")
    assert config.audit.queue_bytes == 1000 and config.audit.ship is not None and config.audit.ship.queue_bytes == 2000
