"""What each MCP server says about its tools, learned from its own tools/list answers.

MCP tool annotations (readOnlyHint, destructiveHint, idempotentHint, openWorldHint)
only travel in the server's tools/list result, never in a tools/call. The sidecar
reads the tools/list answers it forwards and hands the called tool's annotations
to the policy as ``input.mcp.annotations``. They are the tool server's own claims,
so the policy decides how far to trust them per route (rego/data.json: mcp knobs).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

MAX_TOOLS_PER_ROUTE = 1_000
MAX_ROUTES = 256
MAX_ANSWER_BYTES = 1024 * 1024
HINTS = ("readOnlyHint", "destructiveHint", "idempotentHint", "openWorldHint")


class ResponseTap:
    """Keeps a bounded copy of a streamed answer; past the bound it keeps nothing."""

    def __init__(self, limit: int = MAX_ANSWER_BYTES) -> None:
        self.limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self.overflowed = False

    def feed(self, chunk: bytes) -> None:
        if self.overflowed:
            return
        self._size += len(chunk)
        if self._size > self.limit:
            self.overflowed = True
            self._chunks.clear()
            return
        self._chunks.append(bytes(chunk))

    def body(self) -> bytes:
        return b"" if self.overflowed else b"".join(self._chunks)


def jsonrpc_messages(body: bytes, content_type: str) -> list[Any]:
    """The JSON-RPC messages of an answer: one JSON document, or the data of each SSE event."""
    texts: list[str] = []
    if content_type.split(";", 1)[0].strip().lower() == "text/event-stream":
        event: list[str] = []
        for line in body.decode("utf-8", "replace").splitlines() + [""]:
            if line.startswith("data:"):
                event.append(line[5:].lstrip(" "))
            elif not line and event:
                texts.append("\n".join(event))
                event = []
    else:
        texts.append(body.decode("utf-8", "replace"))
    messages: list[Any] = []
    for text in texts:
        try:
            value = json.loads(text)
        except ValueError:
            continue
        messages.extend(value if isinstance(value, list) else [value])
    return messages


def _annotations(tool: Any) -> tuple[str, dict[str, Any]] | None:
    if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
        return None
    raw = tool.get("annotations")
    hints = {k: raw[k] for k in HINTS if isinstance(raw, dict) and isinstance(raw.get(k), bool)}
    return tool["name"][:200], hints


class ToolCatalog:
    """Per route, the annotations each tool last declared. Bounded in routes and tools."""

    def __init__(self) -> None:
        self._routes: OrderedDict[str, OrderedDict[str, dict[str, Any]]] = OrderedDict()

    def learn(self, route: str, messages: list[Any]) -> int:
        """Record the tools of every tools/list result among the messages; return how many."""
        learned = 0
        for message in messages:
            result = message.get("result") if isinstance(message, dict) else None
            tools = result.get("tools") if isinstance(result, dict) else None
            if not isinstance(tools, list):
                continue
            for tool in tools:
                found = _annotations(tool)
                if found is not None:
                    self._remember(route, *found)
                    learned += 1
        return learned

    def _remember(self, route: str, tool: str, hints: dict[str, Any]) -> None:
        known = self._routes.setdefault(route, OrderedDict())
        self._routes.move_to_end(route)
        known[tool] = hints
        known.move_to_end(tool)
        while len(known) > MAX_TOOLS_PER_ROUTE:
            known.popitem(last=False)
        while len(self._routes) > MAX_ROUTES:
            self._routes.popitem(last=False)

    def annotations(self, route: str, tool: str | None) -> dict[str, Any] | None:
        if tool is None:
            return None
        known = self._routes.get(route)
        return dict(known[tool]) if known is not None and tool in known else None
