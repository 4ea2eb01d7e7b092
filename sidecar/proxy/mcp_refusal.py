"""How a refused MCP call is answered, so that the client's user (often a model) can read why.

MCP clients raise on a non-2xx HTTP status and lose the body (the Python SDK 1.x ends
the whole session), so a refusal the policy made is answered in-band, at HTTP 200:

- a refused ``tools/call`` is a ``CallToolResult`` with ``isError: true``: one text block
  the model can act on, and the whole problem document in ``_meta`` under
  ``dev.agent-sidecar/problem`` (``structuredContent`` would have to match the tool's
  output schema); a route's ``mcp.refusal: jsonrpc_error`` selects a JSON-RPC error instead;
- any other refused method is a JSON-RPC error (``error.data`` is the problem document).

Faults where the sidecar could not decide (5xx: policy, store or audit unavailable,
overloaded) and malformed messages keep their HTTP status: the client should retry or
fix the message, and its transport reports that as it does for any server.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from ..documents import InterceptedCall, McpCall
from ..problems import Refusal

PROBLEM_META_KEY = "dev.agent-sidecar/problem"
# Refusals that are about the message itself, not a judgement of the call.
TRANSPORT_CODES = frozenset({"bad_request", "body_too_large", "method_not_allowed", "unsupported_encoding",
                             "request_timeout", "headers_too_large", "header_not_allowed", "method_override",
                             "credential_header", "no_route"})


def answered_in_band(refusal: Refusal) -> bool:
    return refusal.status < 500 and refusal.code not in TRANSPORT_CODES


def model_text(refusal: Refusal) -> str:
    """One sentence the model can act on."""
    reasons = "; ".join(refusal.reasons) or refusal.detail
    if refusal.code in ("approval_required", "approval_pending"):
        return (f"waiting for human approval {refusal.approval_id}; call the same tool with the same arguments "
                f"again once approved ({reasons})")
    if refusal.code == "approval_denied":
        return f"a human denied this call (approval {refusal.approval_id}); do not retry it ({reasons})"
    if refusal.code == "too_many_pending_approvals":
        return (f"not sent: too many calls of this {refusal.extra.get('pending_scope')} are already waiting for human "
                f"approval (at most {refusal.extra.get('max_pending')}); wait until one is decided before another call "
                f"that needs approval ({reasons})")
    if refusal.code == "denied":
        return f"denied: {reasons}"
    return f"refused ({refusal.code}): {reasons}"


def tool_result(refusal: Refusal, call: McpCall) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": call.id,
            "result": {"content": [{"type": "text", "text": model_text(refusal)}], "isError": True,
                       "_meta": {PROBLEM_META_KEY: refusal.problem()}}}


def _error(refusal: Refusal, call: McpCall, in_band: bool) -> dict[str, Any]:
    """A JSON-RPC error; in-band its message is the same sentence a tool result would carry."""
    error = refusal.jsonrpc_error(call.id)
    if in_band:
        error["error"]["message"] = model_text(refusal)
    return error


def answer(refusal: Refusal, call: InterceptedCall) -> web.Response:
    """The JSON-RPC answer to a refused MCP message: one response per request id, in-band when it can be."""
    in_band = answered_in_band(refusal)
    as_results = in_band and call.route.mcp.refusal == "tool_result"
    responses = [tool_result(refusal, c) if as_results and c.method == "tools/call" else _error(refusal, c, in_band)
                 for c in call.mcp_calls if c.id is not None]
    status = 200 if in_band and responses else refusal.status
    if not responses:
        responses = [refusal.jsonrpc_error(None)]
    payload: Any = responses if call.mcp_calls[0].batch_index is not None else responses[0]
    return web.Response(status=status, body=json.dumps(payload).encode(), content_type="application/json",
                        headers=dict(refusal.headers))
