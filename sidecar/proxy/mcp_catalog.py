"""What each MCP server says about its tools, learned from its own tools/list answers, and pinned.

MCP tool annotations (readOnlyHint, destructiveHint, idempotentHint, openWorldHint)
only travel in the server's tools/list result, never in a tools/call. The sidecar
reads the tools/list answers it forwards (JSON or SSE) and hands the called tool's
annotations to the policy as ``input.mcp.annotations``. They are the server's own
claims: unless the route trusts its server (``mcp.trust_server_annotations``) only
the hints that make a call look riskier are passed on, and hints the operator pinned
in config (``mcp.tools``) win. The definition of each tool (title, description,
schemas, annotations) is pinned the first time a task lists it; a later listing that
changes it is ``input.mcp.tool_changed``, so a server cannot swap a tool's meaning
after the agent, or a human, looked at it (docs/mcp.md).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import McpOptions

MAX_TOOLS_PER_ROUTE = 1_000
MAX_ANSWER_BYTES = 1024 * 1024
HINTS = ("readOnlyHint", "destructiveHint", "idempotentHint", "openWorldHint")


class ResponseTap:
    """Sees a copy of an answer's bytes as they are relayed, and hands on each JSON-RPC message once it is whole.

    An SSE answer is read event by event, so a tools/list result is learned the moment its event has
    passed, even if the server keeps the stream open or the agent hangs up before the stream ends. A
    JSON answer is read when it ends. At most ``limit`` bytes are kept at a time; an event or a JSON
    answer larger than that is skipped.
    """

    def __init__(self, on_messages: Callable[[list[Any]], None], limit: int = MAX_ANSWER_BYTES) -> None:
        self.on_messages = on_messages
        self.limit = limit
        self._sse = False
        self._buffer = bytearray()
        self.overflowed = False

    def begin(self, content_type: str) -> None:
        self._sse = content_type.split(";", 1)[0].strip().lower() == "text/event-stream"

    def feed(self, chunk: bytes) -> None:
        if self.overflowed:
            boundary = _EVENT_END.search(chunk) if self._sse else None
            if boundary is None:
                return
            self.overflowed = False  # an SSE event past the limit was skipped; read on from the next one
            chunk = chunk[boundary.end():]
        self._buffer += chunk
        if self._sse:
            self._hand_on_events()
        if len(self._buffer) > self.limit:
            self.overflowed = True
            self._buffer.clear()

    def finish(self) -> None:
        if not self.overflowed and self._buffer:
            text = bytes(self._buffer)
            self._buffer.clear()
            messages = jsonrpc_messages(text + (b"\n\n" if self._sse else b""),
                                        "text/event-stream" if self._sse else "application/json")
            if messages:
                self.on_messages(messages)

    def _hand_on_events(self) -> None:
        last_end = 0
        for found in _EVENT_END.finditer(self._buffer):
            last_end = found.end()
        if last_end:
            complete = bytes(self._buffer[:last_end])
            del self._buffer[:last_end]
            messages = jsonrpc_messages(complete, "text/event-stream")
            if messages:
                self.on_messages(messages)


_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


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


DEFINITION_FIELDS = ("title", "description", "inputSchema", "outputSchema", "annotations")
MAX_SCOPES = 4_096  # (route, task) pairs whose listed tool definitions are pinned
ROUTE_WIDE = "*"


@dataclass(frozen=True)
class ToolChange:
    """A tool whose definition differs from the one first listed in this task."""

    tool: str
    fields: tuple[str, ...]


@dataclass(frozen=True)
class _Known:
    hints: dict[str, bool]
    fingerprints: dict[str, str]  # definition field -> sha256 of its canonical JSON


def _fingerprint(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _definition(tool: Any) -> tuple[str, _Known] | None:
    if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
        return None
    raw = tool.get("annotations")
    hints = {k: raw[k] for k in HINTS if isinstance(raw, dict) and isinstance(raw.get(k), bool)}
    return tool["name"][:200], _Known(hints, {f: _fingerprint(tool.get(f)) for f in DEFINITION_FIELDS})


def _listed_tools(messages: list[Any]) -> list[tuple[str, _Known]]:
    found = []
    for message in messages:
        result = message.get("result") if isinstance(message, dict) else None
        tools = result.get("tools") if isinstance(result, dict) else None
        for tool in tools if isinstance(tools, list) else ():
            definition = _definition(tool)
            if definition is not None:
                found.append(definition)
    return found


class ToolCatalog:
    """What each route's server said about its tools. Bounded in scopes and tools.

    Per route, the latest definition of each tool (``ROUTE_WIDE``); per task, the definition
    first listed in that task, pinned: a later listing that differs is a change the policy
    sees until the task ends. Kept in memory: each sidecar pins what passed through it.
    """

    def __init__(self) -> None:
        self._scopes: OrderedDict[tuple[str, str], OrderedDict[str, _Known]] = OrderedDict()
        self._changes: OrderedDict[tuple[str, str], dict[str, tuple[str, ...]]] = OrderedDict()

    def learn(self, route: str, messages: list[Any], task_id: str | None = None) -> list[ToolChange]:
        """Record the tools of every tools/list result among the messages; return the changes in this task."""
        changes: list[ToolChange] = []
        for name, known in _listed_tools(messages):
            self._remember((route, ROUTE_WIDE), name, known, replace=True)
            if task_id is not None:
                pinned = self._remember((route, task_id), name, known, replace=False)
                differ = tuple(f for f in DEFINITION_FIELDS if pinned.fingerprints[f] != known.fingerprints[f])
                if differ:
                    changes.append(ToolChange(name, differ))
                    self._note_change((route, task_id), name, differ)
        return changes

    def _remember(self, scope: tuple[str, str], tool: str, known: _Known, *, replace: bool) -> _Known:
        tools = self._scopes.setdefault(scope, OrderedDict())
        self._scopes.move_to_end(scope)
        if replace or tool not in tools:
            tools[tool] = known
        tools.move_to_end(tool)
        while len(tools) > MAX_TOOLS_PER_ROUTE:
            tools.popitem(last=False)
        while len(self._scopes) > MAX_SCOPES:
            self._scopes.popitem(last=False)
        return tools.get(tool, known)

    def _note_change(self, scope: tuple[str, str], tool: str, fields: tuple[str, ...]) -> None:
        noted = self._changes.setdefault(scope, {})
        self._changes.move_to_end(scope)
        noted[tool] = tuple(sorted(set(noted.get(tool, ())) | set(fields)))
        while len(self._changes) > MAX_SCOPES:
            self._changes.popitem(last=False)

    def annotations(self, route: str, tool: str | None, task_id: str | None = None) -> dict[str, Any] | None:
        """The tool's hints as first listed in this task, else as last listed on the route."""
        if tool is None:
            return None
        for scope in ((route, task_id), (route, ROUTE_WIDE)) if task_id is not None else ((route, ROUTE_WIDE),):
            known = self._scopes.get(scope)
            if known is not None and tool in known:
                return dict(known[tool].hints)
        return None

    def changed(self, route: str, tool: str | None, task_id: str | None) -> tuple[str, ...]:
        if tool is None or task_id is None:
            return ()
        return self._changes.get((route, task_id), {}).get(tool, ())


# Hints that can only make a call look riskier: believed whoever says them.
_STRICTER = {"destructiveHint": True, "readOnlyHint": False, "idempotentHint": False, "openWorldHint": True}


def policy_hints(server: dict[str, Any] | None, options: McpOptions, tool: str | None) -> dict[str, Any] | None:
    """What the policy is told about a tool: the server's hints (only the stricter ones unless the route
    trusts its server), then the hints the operator pinned in config, which win."""
    pinned = options.tools.get(tool) if tool is not None else None
    if server is None and pinned is None:
        return None
    hints = {k: v for k, v in (server or {}).items() if options.trust_server_annotations or _STRICTER.get(k) == v}
    hints.update(pinned or {})
    return hints
