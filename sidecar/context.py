"""Step 2, context: the policy input document (schema input.v2) for one call."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .documents import InterceptedCall, McpCall
from .proxy.headers import policy_view
from .tasks.measures import call_measures, payload


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
        "task": task,  # the task store's policy view (Task.as_policy_input): input v2 already
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

