"""Step 2, context: the policy input document (schema input.v2) for one call."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .documents import InterceptedCall, McpCall
from .proxy.headers import policy_view
from .tasks.measures import call_measures, payload
from .tasks.store import epoch_ms


INPUT_VERSION = "v2"


@dataclass(frozen=True)
class AgentIdentity:
    id: str
    verified: bool


def build_input(
    call: InterceptedCall,
    agent: AgentIdentity,
    task: dict[str, Any] | None,
    *,
    mcp_call: McpCall | None = None,
    delegation: list[dict[str, Any]] | None = None,
    approval: dict[str, Any] | None = None,
    mcp_annotations: dict[str, Any] | None = None,
    mcp_tool_changed: tuple[str, ...] = (),
    now_ns: int | None = None,
) -> dict[str, Any]:
    now_ns = now_ns if now_ns is not None else time.time_ns()
    seconds = now_ns / 1e9
    document: dict[str, Any] = {
        "version": INPUT_VERSION,
        "request": {
            "method": call.method,
            "scheme": call.scheme,
            "host": call.host,
            "port": call.port,
            "path": call.path,
            "query": call.query,
            "raw_query": call.query_string,
            "headers": policy_view(call.headers),
            "body": call.body_json,
            "body_readable": call.body_readable,
            "body_sha256": call.body_sha256,
            "body_size": len(call.body),
            "content_type": call.content_type,
            "mode": call.mode,
            # Only the route's configured measures: the policy falls back to its own reading of the body.
            "measures": call_measures(call.route.measures, payload(call.body_json, mcp_call)),
        },
        "tool": {"route": call.route.name, "labels": dict(call.route.labels), "upstream": call.route.upstream,
                 "protocol": call.route.protocol, "measures": [m.name for m in call.route.measures]},
        "mcp": _mcp(mcp_call, mcp_annotations, mcp_tool_changed),
        "agent": {"id": agent.id, "verified": agent.verified},
        "task": task_input(task),
        "delegation": delegation or [],
        "approval": approval,
        "time": {
            "now": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{now_ns % 1_000_000_000 // 1000:06d}Z",
            "now_ns": now_ns,
        },
    }
    if call.original_destination is not None:
        # Transparent modes: where the agent's connection was going before iptables redirected it.
        document["request"]["original_destination"] = call.original_destination
    return document


def _mcp(mcp_call: McpCall | None, annotations: dict[str, Any] | None,
         tool_changed: tuple[str, ...]) -> dict[str, Any] | None:
    if mcp_call is None:
        return None
    document = mcp_call.as_input()
    if annotations is not None:
        document["annotations"] = annotations  # from the tools/list answers and the route's pins
    if tool_changed:
        document["tool_changed"] = {"fields": list(tool_changed)}  # redefined since this task first listed it
    return document


def task_input(task: dict[str, Any] | None) -> dict[str, Any] | None:
    """The task as input v2 sends it. The pipeline passes the store's policy view (``Task.as_policy_input``),
    which is v2 already and passes through; a v1-shaped task (``Task.as_input``, the admin API's view) gets
    ``history.recent`` reduced here to what rules read, in the form that is cheapest for the engine to take in.

    v1 sent the last 20 calls as objects of seven strings each, most of the bytes of a typical input
    (every byte costs the embedded engine ~530 instructions to decode). v2 sends how many there are
    and, per outcome, when each was decided in Unix milliseconds, oldest first:
    ``{"calls": 20, "at_ms": {"allow": [1795775853417, ...], "deny": [...]}}``. Reserved calls are in
    it as allowed ones, as in v1; ``history.in_flight`` still counts them apart.
    """
    if task is None:
        return None
    history = task.get("history")
    if not isinstance(history, dict) or not isinstance(history.get("recent"), list):
        return task
    return {**task, "history": {**history, "recent": recent_v2(history["recent"])}}


def recent_v2(recent: list[dict[str, Any]]) -> dict[str, Any]:
    at_ms: dict[str, list[int]] = {}
    for entry in recent:
        at = entry.get("at")
        at_ms.setdefault(str(entry.get("outcome")), []).append(epoch_ms(at) if isinstance(at, str) else 0)
    return {"calls": len(recent), "at_ms": at_ms}
