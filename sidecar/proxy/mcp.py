"""MCP over HTTP: JSON-RPC 2.0 requests, single or batched; tools/call parsed for the policy.

Only on routes configured ``protocol: mcp``; there every message must be well-formed
JSON-RPC 2.0, each element of a batch included, or it is refused: a body is never
judged as REST on an MCP route, nor as MCP anywhere else.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ..documents import InterceptedCall, McpCall
from ..problems import Refusal

# Each message of a batch is decided on its own, with the whole body in its policy input and its audit event:
# an unbounded batch would turn one body into thousands of evaluations and as many copies of it in the audit
# log. And a batch is one call of its task, so it carries at most one request beside notifications and
# responses. MCP clients send one request at a time (the 2025-06-18 specification dropped batching).
MAX_BATCH = 32


def parse_calls(body: Any) -> tuple[McpCall, ...]:
    """Every JSON-RPC message in the body; anything that is not well-formed JSON-RPC 2.0 refuses the body."""
    if isinstance(body, dict):
        return (_one(body, None, None),)
    if not isinstance(body, list) or not body:
        raise Refusal("bad_request", "an MCP route takes a JSON-RPC 2.0 object or a non-empty batch of them")
    if len(body) > MAX_BATCH:
        raise Refusal("bad_request", f"an MCP batch holds at most {MAX_BATCH} messages, this one {len(body)}")
    calls = tuple(_one(item, index, len(body)) for index, item in enumerate(body))
    requests = sum(1 for c in calls if c.is_request)
    if requests > 1:
        # Each would be a call of the task, judged against the others; a batch is judged and counted as one.
        raise Refusal("bad_request", f"an MCP batch carries at most one request (other than notifications and "
                      f"responses), this one {requests}: send them one at a time")
    return calls


# JSON-RPC's members, and those of tools/call's params. Go's encoding/json (and MCP servers built on it) match
# keys ignoring case: {"Method": "tools/call", "result": {}} is a response here and a tool call there.
_MESSAGE_MEMBERS = frozenset({"jsonrpc", "id", "method", "params", "result", "error"})
_CALL_MEMBERS = frozenset({"name", "arguments", "_meta"})


def _refuse_case_variants(members: Any, names: frozenset[str], where: str) -> None:
    for key in members:
        if key not in names and key.lower() in names:
            raise Refusal("bad_request", f"{where}: member {key[:40]!r} is {key.lower()!r} to a server that "
                          "matches keys ignoring case")


def _one(item: Any, index: int | None, size: int | None) -> McpCall:
    where = f"batch element {index}" if index is not None else "the message"
    if not isinstance(item, dict) or item.get("jsonrpc") != "2.0":
        raise Refusal("bad_request", f"{where} is not a JSON-RPC 2.0 object")
    _refuse_case_variants(item, _MESSAGE_MEMBERS, where)
    request_id = item.get("id")
    if request_id is not None and (isinstance(request_id, bool) or not isinstance(request_id, (str, int, float))):
        raise Refusal("bad_request", f"{where}: a JSON-RPC id is a string or a number")
    method = item.get("method")
    if "method" not in item and ("result" in item or "error" in item):
        # A response the client sends back (e.g. to a sampling request): no tool is called.
        return McpCall("(response)", item.get("id"), None, None, index, size)
    if not isinstance(method, str) or not method:
        raise Refusal("bad_request", "JSON-RPC request without a method")
    params = item.get("params")
    if params is not None and not isinstance(params, (dict, list)):
        raise Refusal("bad_request", "JSON-RPC params must be an object or an array")
    tool: str | None = None
    arguments: dict[str, Any] | None = None
    if isinstance(params, dict):
        _refuse_case_variants(params, _CALL_MEMBERS, where)
    if method == "tools/call":
        if not isinstance(params, dict) or not isinstance(params.get("name"), str) or not params["name"]:
            raise Refusal("bad_request", "tools/call without a tool name")
        tool = params["name"]
        raw_arguments = params.get("arguments", {})
        if raw_arguments is not None and not isinstance(raw_arguments, dict):
            raise Refusal("bad_request", "tools/call arguments must be an object")
        arguments = raw_arguments or {}
    return McpCall(method, item.get("id"), tool, arguments, index, size)


def call_binding(call: InterceptedCall) -> str | None:
    """What an approval binds on an MCP route: the tool and its arguments, not the message bytes.

    MCP clients give every request a new JSON-RPC id, so a retry of a held tools/call never
    has the bytes of the first; the approval binds JSON-RPC method, tool name and the
    canonical form of the arguments instead (with route, agent and task beside it). A changed
    argument is a new call. A batch keeps the byte binding.
    """
    if not call.route.is_mcp or len(call.mcp_calls) != 1 or call.mcp_calls[0].method != "tools/call":
        return None
    only = call.mcp_calls[0]
    canonical = json.dumps({"method": only.method, "tool": only.tool, "arguments": only.arguments},
                           sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "mcp-call:" + hashlib.sha256(canonical.encode()).hexdigest()
