"""MCP over HTTP: JSON-RPC 2.0 requests, single or batched; tools/call parsed for the policy."""

from __future__ import annotations

from typing import Any

from ..documents import McpCall
from ..problems import Refusal


def looks_like_jsonrpc(body: Any) -> bool:
    if isinstance(body, dict):
        return body.get("jsonrpc") == "2.0" and "method" in body
    if isinstance(body, list) and body:
        return all(isinstance(item, dict) and item.get("jsonrpc") == "2.0" for item in body)
    return False


def parse_calls(body: Any) -> tuple[McpCall, ...]:
    """Every JSON-RPC request in the message; a malformed one refuses the message."""
    if isinstance(body, dict):
        return (_one(body, None, None),)
    items = list(body)
    return tuple(_one(item, index, len(items)) for index, item in enumerate(items))


def _one(item: dict[str, Any], index: int | None, size: int | None) -> McpCall:
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
    if method == "tools/call":
        if not isinstance(params, dict) or not isinstance(params.get("name"), str) or not params["name"]:
            raise Refusal("bad_request", "tools/call without a tool name")
        tool = params["name"]
        raw_arguments = params.get("arguments", {})
        if raw_arguments is not None and not isinstance(raw_arguments, dict):
            raise Refusal("bad_request", "tools/call arguments must be an object")
        arguments = raw_arguments or {}
    return McpCall(method, item.get("id"), tool, arguments, index, size)
