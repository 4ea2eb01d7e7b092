"""Lone surrogates that arrive as raw bytes, not as \\u escapes.

``json.loads`` decodes a bytes body with ``surrogatepass`` (UTF-8) or as UTF-16/32 when it sniffs them,
so a body holding the bytes ED A0 80 (a UTF-8-encoded lone surrogate, as CESU-8/WTF-8 write it), or a
UTF-16 body with an unpaired D800, parses to a str with a lone surrogate. The door's surrogate check
only looks for ``\\u`` escapes, so it accepts the body; orjson then cannot write the policy input
(503 policy_unavailable, not a 4xx) and the audit chain cannot encode the event (UnicodeEncodeError):
the whole batch it was written with is lost, other calls' events included. A header value with
non-UTF-8 bytes (aiohttp decodes with surrogateescape) does the same.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import orjson
import pytest

from harness import EchoTool, SidecarFactory, open_task
from sidecar.audit.chain import HashChainLog
from sidecar.audit.writer import AuditWriter, _serialised
from sidecar.jsoncodec import JsonDocument, SerialisedJson
from sidecar.problems import Refusal
from sidecar.proxy.body import read_body
from test_audit import blocked_lane

RAW_SURROGATE_BODIES = [
    b'{"name":"\xed\xa0\x80"}',  # value
    b'{"\xed\xb0\x80":1}',  # key
    '{"name":"X"}'.encode("utf-16-le").replace(b"X\x00", b"\x00\xd8"),  # UTF-16 with an unpaired D800
    '{"name":"\\ud800"}'.encode("utf-16-le"),  # an escape, in UTF-16: the b"\\u" prefilter never sees it
    b"[" + b",".join([b"0.5"] * 250_000) + b',"\xed\xa0\x80"]',  # 1 MiB, 2 brackets: the audit queue holds ~8 MB of floats
]
IDS = ["utf8-encoded-surrogate-value", "utf8-encoded-surrogate-key", "utf16-lone-surrogate", "utf16-escaped-surrogate",
       "large-body"]


@pytest.mark.parametrize("body", RAW_SURROGATE_BODIES, ids=IDS)
@pytest.mark.parametrize("content_type", ["application/json", ""])
def test_a_raw_lone_surrogate_is_refused_at_the_door(body: bytes, content_type: str) -> None:
    """Accepted, it is a body orjson cannot write (the goal of 46772d6: no accepted body makes orjson fail)."""
    try:
        view = read_body(body, content_type)
    except Refusal as refused:
        assert refused.code == "bad_request"
        return
    orjson.dumps({"request": {"body": view.value}})  # TypeError: str is not valid UTF-8: surrogates not allowed
    queued = _serialised({"type": "decision", "input": JsonDocument({"request": {"body": view.value}})})
    assert isinstance(queued["input"], SerialisedJson)


def test_one_agents_body_does_not_lose_other_events_in_its_audit_batch(tmp_path: Path) -> None:
    """The chain writes a batch at once: one event it cannot encode loses every event written with it."""
    path = tmp_path / "audit.jsonl"
    lane, release = blocked_lane()
    writer = AuditWriter(HashChainLog(path), lane=lane)
    try:
        writer.append({"type": "decision", "decision_id": "ordinary",
                       "input": JsonDocument({"request": {"body": {"amount": 49}}})}, receipt=False)
        try:
            hostile = read_body(b'{"note":"\xed\xa0\x80"}', "application/json").value
        except Refusal:
            hostile = None  # refused at the door: its refusal event holds no such string
        writer.append({"type": "decision", "decision_id": "hostile",
                       "input": JsonDocument({"request": {"body": hostile}})}, receipt=False)
    finally:
        release.set()
        writer.close()
        lane.stop()
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert "ordinary" in [e.get("decision_id") for e in events], events


async def test_an_event_json_cannot_carry_is_written_as_such_and_the_others_with_it(tmp_path: Path) -> None:
    """Defence behind the door: the chain writes a stand-in for the event, verifies, and loses nothing else;
    the event's writer hears it was not written (fail closed), and the error is counted."""
    from sidecar.audit.chain import UNENCODABLE, verify_files

    path = tmp_path / "audit.jsonl"
    errors: list[int] = []
    writer = AuditWriter(HashChainLog(path), on_error=errors.append)
    try:
        receipts = [writer.append({"type": "decision", "decision_id": "before"}),
                    writer.append({"type": "decision", "decision_id": "bad", "note": "\ud800"}),
                    writer.append({"type": "decision", "decision_id": "after"})]
        outcomes = await asyncio.gather(*[r for r in receipts if r is not None])
    finally:
        writer.close()
    assert [o and o["decision_id"] for o in outcomes] == ["before", None, "after"]
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["type"] for e in events] == ["decision", UNENCODABLE, "decision"]
    assert events[1]["event"] == {"type": "decision", "decision_id": "bad"} and "note" not in events[1]
    assert verify_files([path]).ok and errors == [1]


async def _raw(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await reader.read()
    writer.close()
    return data


@pytest.mark.parametrize("where", ["body", "header"])
async def test_a_raw_surrogate_is_a_4xx_and_audited_through_the_sidecar(
        make_sidecar: SidecarFactory, echo_tool: EchoTool, where: str) -> None:
    sc = await make_sidecar()
    task = await open_task(sc.admin)
    body = b'{"name":"\xed\xa0\x80"}' if where == "body" else b'{"name":"Ada"}'
    header = b"X-Note: a\xed\xa0\x80\xff\r\n" if where == "header" else b""
    request = (b"POST /crm/customers HTTP/1.1\r\nHost: crm.example.com\r\nX-Agent-Task: " + task.encode()
               + b"\r\nContent-Type: application/json\r\n" + header
               + b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
    answer = await _raw(sc.sidecar.config.proxy.port, request)
    status = int(answer.split(b" ", 2)[1])
    assert 400 <= status < 500, answer[:400]
    assert b"application/problem+json" in answer
    assert echo_tool.seen == []
    # The refusal is in the audit chain, and no event was lost writing it.
    async with httpx.AsyncClient() as client:  # a later call makes the writer write (and report) again
        # Its decision event is written before it leaves, after the refusal's (one writer, in order).
        await client.get(f"{sc.proxy}/crm/customers", headers={"X-Agent-Task": task, "Host": "crm.example.com"})
    events = [json.loads(line) for line in sc.audit_path.read_text().splitlines()]
    assert not [e for e in events if e.get("type") == "audit.resumed"], events


@pytest.mark.parametrize("message", [
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"\xed\xa0\x80"}}',
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"lookup","arguments":{"q":"\xed\xa0\x80"}}}',
], ids=["tool-name", "argument"])
async def test_a_raw_surrogate_in_an_mcp_tools_call_is_a_4xx_not_a_500(
        make_sidecar: SidecarFactory, echo_tool: EchoTool, message: bytes) -> None:
    """mcp.call_binding encodes the tool and arguments as UTF-8: UnicodeEncodeError, a 500 internal_error."""
    sc = await make_sidecar()
    task = await open_task(sc.admin)
    request = (b"POST /tools/mcp HTTP/1.1\r\nHost: x\r\nX-Agent-Task: " + task.encode()
               + b"\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\n"
               + b"Content-Length: " + str(len(message)).encode() + b"\r\nConnection: close\r\n\r\n" + message)
    answer = await _raw(sc.sidecar.config.proxy.port, request)
    status = int(answer.split(b" ", 2)[1])
    assert 400 <= status < 500, answer[:600]
    assert echo_tool.seen == []
