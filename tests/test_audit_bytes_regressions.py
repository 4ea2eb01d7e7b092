"""Regressions found attacking the audit writer's byte bound (7027fe9, 48265b6, a8fda5e).

``queue_bytes`` is meant to bound the memory an agent can make the audit queue hold. It counts only
the serialised bytes of top-level JsonDocument values, so: an input orjson cannot serialise (an
integer beyond 64 bits, in a 40-byte body) counts as DRAIN_BYTES (4 MiB) and 16 of them refuse
every other call; bytes outside a JsonDocument (task.opened's labels) count as nothing; and the
queue holds the parsed document, which can be ~25x its serialised bytes.
"""

from __future__ import annotations

import gc
import json
import tracemalloc
from pathlib import Path

import pytest

from sidecar.audit.chain import AuditError, HashChainLog
from sidecar.audit.writer import QUEUE_BYTES, AuditWriter, _serialised
from sidecar.jsoncodec import JsonDocument, SerialisedJson
from sidecar.problems import Refusal
from sidecar.strictjson import strict_json
from test_audit import blocked_lane


def test_a_small_input_beyond_orjson_counts_as_its_size_not_as_four_mebibytes(tmp_path: Path) -> None:
    """A 40-byte JSON body with a 65-bit integer (the policy refuses it, its decision event is audited)."""
    lane, release = blocked_lane()
    writer = AuditWriter(HashChainLog(tmp_path / "audit.jsonl"), lane=lane)
    try:
        for n in range(20):
            writer.append({"type": "decision", "n": n,
                           "input": JsonDocument({"request": {"body": {"note": 2 ** 100}}})}, receipt=False)
        # An ordinary call's decision next: 20 tiny events queued, nowhere near 64 MiB of policy input.
        writer.append({"type": "decision", "input": JsonDocument({"request": {"body": {"amount": 49}}})},
                      receipt=False)
        assert writer.queued_bytes < 1024 * 1024
    finally:
        release.set()
        writer.close()
        lane.stop()


def test_bytes_an_event_holds_outside_a_json_document_count_too(tmp_path: Path) -> None:
    """task.opened carries the agent's labels (POST /v1/tasks takes up to 64 KiB): 10,000 of them are ~14 GiB
    as Python objects, and queue_bytes sees none of it."""
    labels = json.dumps({"ticket": "x" * 60_000})
    lane, release = blocked_lane()
    writer = AuditWriter(HashChainLog(tmp_path / "audit.jsonl"), queue_bytes=1024 * 1024, lane=lane)
    try:
        with pytest.raises(AuditError):
            for n in range(100):  # 6 MB of labels under a 1 MiB bound
                writer.append({"type": "task.opened", "task_id": f"t-{n}", "labels": json.loads(labels)},
                              receipt=False)
    finally:
        release.set()
        writer.close()
        lane.stop()


def test_a_string_counts_its_utf8_bytes_not_its_characters() -> None:
    """An intent of 16,000 emoji is 64 KB queued (UTF-8 in the chain, more as a Python str), not 16,000."""
    from sidecar.audit.writer import embedded_bytes

    assert embedded_bytes({"type": "task.opened", "intent": "\U0001F600" * 16_000}) == 11 + 64_000
    assert embedded_bytes({"type": "task.opened", "intent": "a" * 16_000}) == 11 + 16_000


def test_the_queue_holds_about_the_bytes_it_counts(tmp_path: Path) -> None:
    """A 1 MiB body of empty arrays parses to ~26 MB of Python objects: queue_bytes must bound what is held."""
    body = "[" + ",".join(["[]"] * (1024 * 1024 // 3)) + "]"
    bound = 4 * 1024 * 1024
    lane, release = blocked_lane()
    writer = AuditWriter(HashChainLog(tmp_path / "audit.jsonl"), queue_bytes=bound, lane=lane)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        try:
            while True:
                writer.append({"type": "decision", "input": JsonDocument({"request": {"body": json.loads(body)}})},
                              receipt=False)
        except AuditError:
            pass
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
        assert held < 4 * bound, f"{held / 2**20:.0f} MiB held under a bound of {bound / 2**20:.0f} MiB"
    finally:
        tracemalloc.stop()
        release.set()
        writer.close()
        lane.stop()
    assert QUEUE_BYTES == 64 * 1024 * 1024


_EMPTY_ARRAYS = b",".join([b"[]"] * 200_000)


@pytest.mark.parametrize("body", [
    b"[" * 128 + b"]" * 128,
    b'{"a":' * 127 + b"{}" + b"}" * 127,
    b'{"max":18446744073709551615,"min":-9223372036854775808}',
    b"[" + _EMPTY_ARRAYS + b"]",
], ids=["128-arrays-deep", "128-objects-deep", "64-bit-bounds", "many-small-values"])
def test_every_body_the_door_accepts_is_queued_as_bytes(body: bytes) -> None:
    """The byte bound holds only if no accepted body makes orjson fail, which would queue the parsed tree."""
    queued = _serialised({"type": "decision", "input": JsonDocument({"request": {"body": strict_json(body)}})})
    assert isinstance(queued["input"], SerialisedJson)


@pytest.mark.parametrize("body", [
    b"[" + _EMPTY_ARRAYS + b",18446744073709551616]",
    b"[" + _EMPTY_ARRAYS + b",-9223372036854775809]",
    b"[" + _EMPTY_ARRAYS + b"," + b"[" * 129 + b"]" * 129 + b"]",
    b"[1" + b"0" * 5000 + b"]",
], ids=["integer-beyond-64-bits", "negative-integer-beyond-64-bits", "129-deep", "5000-digits"])
def test_a_body_orjson_cannot_write_is_refused_at_the_door(body: bytes) -> None:
    """attack3: one such value in a 1 MiB body of empty arrays held 22.5 MB in the queue, counted as 1.4 MB."""
    with pytest.raises(Refusal) as refused:
        strict_json(body)
    assert refused.value.code == "bad_request"
