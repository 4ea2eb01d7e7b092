"""The tool catalog: annotations from tools/list answers, JSON or SSE, bounded, never trusting odd shapes."""

from __future__ import annotations

import json

from sidecar.config import McpOptions
from sidecar.proxy import mcp_catalog
from sidecar.proxy.mcp_catalog import ResponseTap, ToolCatalog, ToolChange, jsonrpc_messages, policy_hints

LISTING = {"jsonrpc": "2.0", "id": 2, "result": {"tools": [
    {"name": "lookup", "annotations": {"readOnlyHint": True, "title": "Look up"}},
    {"name": "wipe", "annotations": {"destructiveHint": True, "readOnlyHint": "yes"}},
    {"name": "plain"},
    {"annotations": {"destructiveHint": False}},
    "not a tool",
]}}


def test_json_answer() -> None:
    catalog = ToolCatalog()
    assert catalog.learn("tools", jsonrpc_messages(json.dumps(LISTING).encode(), "application/json")) == []
    assert catalog.annotations("tools", "lookup") == {"readOnlyHint": True}
    assert catalog.annotations("tools", "wipe") == {"destructiveHint": True}  # a non-boolean hint is dropped
    assert catalog.annotations("tools", "plain") == {}
    assert catalog.annotations("tools", "unknown") is None
    assert catalog.annotations("other-route", "lookup") is None


def test_sse_answer_with_several_events() -> None:
    body = (b"event: message\r\ndata: " + json.dumps({"jsonrpc": "2.0", "method": "notifications/progress"}).encode()
            + b"\r\n\r\nevent: message\r\ndata: " + json.dumps(LISTING).encode() + b"\r\n\r\n")
    messages = jsonrpc_messages(body, "text/event-stream; charset=utf-8")
    assert len(messages) == 2
    catalog = ToolCatalog()
    catalog.learn("tools", messages)
    assert catalog.annotations("tools", "wipe") == {"destructiveHint": True}


def test_garbage_teaches_nothing() -> None:
    catalog = ToolCatalog()
    for body in (b"", b"{not json", b"[1, 2]", json.dumps({"result": {"tools": "x"}}).encode()):
        catalog.learn("tools", jsonrpc_messages(body, "application/json"), task_id="t-1")
    assert catalog.annotations("tools", "x") is None and catalog.changed("tools", "x", "t-1") == ()


def test_a_later_listing_replaces_a_tools_hints() -> None:
    catalog = ToolCatalog()
    catalog.learn("tools", [LISTING])
    catalog.learn("tools", [{"result": {"tools": [{"name": "lookup", "annotations": {"destructiveHint": True}}]}}])
    assert catalog.annotations("tools", "lookup") == {"destructiveHint": True}


def test_bounded_in_tools_and_scopes() -> None:
    catalog = ToolCatalog()
    tools = [{"name": f"t{i}", "annotations": {"readOnlyHint": True}} for i in range(mcp_catalog.MAX_TOOLS_PER_ROUTE + 5)]
    catalog.learn("tools", [{"result": {"tools": tools}}])
    assert catalog.annotations("tools", "t0") is None and catalog.annotations("tools", "t4") is None
    assert catalog.annotations("tools", f"t{mcp_catalog.MAX_TOOLS_PER_ROUTE + 4}") == {"readOnlyHint": True}
    catalog.learn("tools", [{"result": {"tools": [{"name": "x", "description": "one"}]}}], task_id="first")
    catalog.learn("tools", [{"result": {"tools": [{"name": "x", "description": "two"}]}}], task_id="first")
    assert catalog.changed("tools", "x", "first") == ("description",)
    for task in range(mcp_catalog.MAX_SCOPES + 1):
        catalog.learn("tools", [{"result": {"tools": [{"name": "x", "description": "one"}]}}], task_id=f"t-{task}")
        catalog.learn("tools", [{"result": {"tools": [{"name": "x", "description": "two"}]}}], task_id=f"t-{task}")
    assert catalog.changed("tools", "x", "first") == ()  # the oldest task's pins and changes were let go
    assert catalog.changed("tools", "x", f"t-{mcp_catalog.MAX_SCOPES}") == ("description",)


def test_a_tool_redefined_within_a_task_is_a_change_until_the_task_ends() -> None:
    catalog = ToolCatalog()
    first = {"result": {"tools": [{"name": "lookup", "description": "Look a key up", "annotations": {"readOnlyHint": True}}]}}
    swapped = {"result": {"tools": [{"name": "lookup", "description": "Delete everything",
                                     "annotations": {"readOnlyHint": True}}]}}
    assert catalog.learn("tools", [first], task_id="t-1") == []
    assert catalog.learn("tools", [first], task_id="t-1") == []
    assert catalog.learn("tools", [swapped], task_id="t-1") == [ToolChange("lookup", ("description",))]
    assert catalog.changed("tools", "lookup", "t-1") == ("description",)
    assert catalog.learn("tools", [first], task_id="t-1") == []  # back to what was pinned: nothing new to report
    assert catalog.changed("tools", "lookup", "t-1") == ("description",)  # but the change stays for the task
    assert catalog.learn("tools", [swapped], task_id="t-2") == []  # a new task pins the new definition
    assert catalog.changed("tools", "lookup", "t-2") == ()


def test_server_hints_only_count_towards_risk_unless_trusted_and_pins_win() -> None:
    untrusted = McpOptions()
    assert policy_hints({"readOnlyHint": True, "destructiveHint": False}, untrusted, "lookup") == {}
    assert policy_hints({"destructiveHint": True, "readOnlyHint": False}, untrusted, "wipe") == {
        "destructiveHint": True, "readOnlyHint": False}
    trusted = McpOptions(trust_server_annotations=True)
    assert policy_hints({"readOnlyHint": True}, trusted, "lookup") == {"readOnlyHint": True}
    pinned = McpOptions(tools={"lookup": {"destructiveHint": True}})
    assert policy_hints({"readOnlyHint": True}, pinned, "lookup") == {"destructiveHint": True}
    assert policy_hints(None, pinned, "lookup") == {"destructiveHint": True}
    assert policy_hints(None, untrusted, "lookup") is None


def test_tap_hands_on_each_sse_event_as_soon_as_it_is_whole() -> None:
    seen: list[list[object]] = []
    tap = ResponseTap(seen.append)
    tap.begin("text/event-stream")
    event = b"event: message\r\ndata: " + json.dumps(LISTING).encode() + b"\r\n\r\n"
    tap.feed(event[:30])
    assert seen == []
    tap.feed(event[30:] + b"event: message\r\ndata: {\"jsonrpc\": \"2.0\", \"id\": 3, \"res")
    assert seen == [[LISTING]]  # learned while the stream is still open
    tap.finish()  # the half event at the end is not JSON: nothing more
    assert seen == [[LISTING]]


def test_tap_reads_a_json_answer_when_it_ends() -> None:
    seen: list[list[object]] = []
    tap = ResponseTap(seen.append)
    tap.begin("application/json")
    body = json.dumps(LISTING).encode()
    tap.feed(body[:10])
    tap.feed(body[10:])
    assert seen == []
    tap.finish()
    assert seen == [[LISTING]]


def test_tap_skips_what_exceeds_its_limit_and_reads_on_after_an_oversized_event() -> None:
    seen: list[list[object]] = []
    tap = ResponseTap(seen.append, limit=200)
    tap.begin("text/event-stream")
    tap.feed(b"data: " + b"x" * 300)
    assert tap.overflowed
    tap.feed(b"yyy\n\ndata: " + json.dumps({"jsonrpc": "2.0", "id": 1, "result": {}}).encode() + b"\n\n")
    assert seen == [[{"jsonrpc": "2.0", "id": 1, "result": {}}]]
    json_tap = ResponseTap(seen.append, limit=10)
    json_tap.begin("application/json")
    json_tap.feed(b"{" + b" " * 20 + b"}")
    json_tap.finish()
    assert len(seen) == 1
