"""The tool catalog: annotations from tools/list answers, JSON or SSE, bounded, never trusting odd shapes."""

from __future__ import annotations

import json

from sidecar.proxy import mcp_catalog
from sidecar.proxy.mcp_catalog import ResponseTap, ToolCatalog, jsonrpc_messages

LISTING = {"jsonrpc": "2.0", "id": 2, "result": {"tools": [
    {"name": "lookup", "annotations": {"readOnlyHint": True, "title": "Look up"}},
    {"name": "wipe", "annotations": {"destructiveHint": True, "readOnlyHint": "yes"}},
    {"name": "plain"},
    {"annotations": {"destructiveHint": False}},
    "not a tool",
]}}


def test_json_answer() -> None:
    catalog = ToolCatalog()
    assert catalog.learn("tools", jsonrpc_messages(json.dumps(LISTING).encode(), "application/json")) == 3
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
        assert catalog.learn("tools", jsonrpc_messages(body, "application/json")) == 0


def test_a_later_listing_replaces_a_tools_hints() -> None:
    catalog = ToolCatalog()
    catalog.learn("tools", [LISTING])
    catalog.learn("tools", [{"result": {"tools": [{"name": "lookup", "annotations": {"destructiveHint": True}}]}}])
    assert catalog.annotations("tools", "lookup") == {"destructiveHint": True}


def test_bounded_in_tools_and_routes() -> None:
    catalog = ToolCatalog()
    tools = [{"name": f"t{i}", "annotations": {"readOnlyHint": True}} for i in range(mcp_catalog.MAX_TOOLS_PER_ROUTE + 5)]
    catalog.learn("tools", [{"result": {"tools": tools}}])
    assert catalog.annotations("tools", "t0") is None and catalog.annotations("tools", "t4") is None
    assert catalog.annotations("tools", f"t{mcp_catalog.MAX_TOOLS_PER_ROUTE + 4}") == {"readOnlyHint": True}
    for route in range(mcp_catalog.MAX_ROUTES + 1):
        catalog.learn(f"r{route}", [{"result": {"tools": [{"name": "x"}]}}])
    assert catalog.annotations("tools", f"t{mcp_catalog.MAX_TOOLS_PER_ROUTE + 4}") is None


def test_tap_keeps_nothing_past_its_limit() -> None:
    tap = ResponseTap(limit=10)
    tap.feed(b"12345")
    assert tap.body() == b"12345"
    tap.feed(b"678901")
    assert tap.overflowed and tap.body() == b""
    tap.feed(b"x")
    assert tap.body() == b""
