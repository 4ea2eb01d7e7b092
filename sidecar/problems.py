"""Refusals: one exception type, mapped to status codes and rendered in one place.

Every refusal is RFC 9457 problem+json with a stable ``code``; a refused MCP
JSON-RPC request is answered as a JSON-RPC error for its id carrying the same
fields, so the agent's MCP client can show why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

PROBLEM_TYPE_BASE = "https://agent-sidecar.dev/problems/"

# code -> (HTTP status, title). The one table that maps refusals to statuses.
PROBLEMS: dict[str, tuple[int, str]] = {
    "bad_request": (400, "The request could not be understood"),
    "unknown_task": (400, "The task in X-Agent-Task is unknown or has ended"),
    "credential_header": (400, "The agent sent a duplicated or spoofed credential header"),
    "header_not_allowed": (400, "A header that could change how the upstream reads the request"),
    "method_override": (400, "A method override would change the method after the decision"),
    "unauthorized": (401, "Authentication is required"),
    "delegation_invalid": (403, "The X-Agent-Delegation credential cannot be verified"),
    "denied": (403, "Denied by policy"),
    "no_route": (403, "No route matches this destination"),
    "tunnel_denied": (403, "CONNECT tunnels are not allowed for this destination"),
    "approval_required": (403, "This call needs human approval"),
    "approval_invalid": (403, "The approval id is unknown"),
    # A presented approval made for another request: each way it differs has its own code.
    "approval_wrong_method": (403, "The approval was made for another method"),
    "approval_wrong_target": (403, "The approval was made for another URL"),
    "approval_wrong_body": (403, "The approval was made for another body"),
    "approval_wrong_agent": (403, "The approval was made for another agent"),
    "approval_wrong_task": (403, "The approval was made for another task"),
    "approval_wrong_route": (403, "The approval was made for another route"),
    "approval_denied": (403, "The approval was denied"),
    "approval_expired": (403, "The approval has expired"),
    "approval_used": (403, "The approval was already used"),
    "approval_pending": (403, "The approval is still pending"),
    "approver_forbidden": (403, "This approver may not decide on this approval"),
    # Intercepted TLS (issue 18). The tls_* codes refuse a handshake (an alert, and a refusal event).
    "tls_no_sni": (403, "A redirected TLS connection named no server (SNI)"),
    "tls_unknown_sni": (403, "No route intercepts TLS for this server name"),
    "tls_sni_mismatch": (403, "The TLS server name differs from the CONNECT host"),
    "not_found": (404, "No such resource"),
    "method_not_allowed": (405, "Method not allowed"),
    "request_timeout": (408, "The request was not received in time"),
    "approval_conflict": (409, "The approval was already decided"),
    "body_too_large": (413, "The request body exceeds the configured limit"),
    "unsupported_encoding": (415, "The request's Content-Encoding is not accepted on this route"),
    "misdirected_request": (421, "This intercepted TLS connection is for another host"),
    # A held call past approvals.max_pending_per_task / _per_agent: never forwarded, nobody asked.
    "too_many_pending_approvals": (429, "Too many approvals are already waiting for a human"),
    "headers_too_large": (431, "The request line or headers exceed the configured limits"),
    "internal_error": (500, "The sidecar failed while handling this call"),
    "upstream_error": (502, "The upstream tool could not be reached"),
    "overloaded": (503, "Too many calls in flight; retry shortly"),
    "policy_unavailable": (503, "The policy engine gave no valid decision"),
    "audit_unavailable": (503, "The audit log cannot be written"),
    "credential_unavailable": (503, "No credential could be minted"),
    "store_unavailable": (503, "The state store is unavailable"),
    "task_contended": (503, "Too many calls of this task are being decided at once; retry shortly"),
    "identity_unavailable": (503, "The agent's workload identity is missing, expired or unverifiable"),
    "upstream_timeout": (504, "The upstream tool did not answer in time"),
}

# JSON-RPC error codes for MCP clients: -32600 invalid request, and an
# implementation-defined server error range for refusals.
JSONRPC_CODES: dict[str, int] = {
    "bad_request": -32600,
    "body_too_large": -32600,
}
JSONRPC_REFUSAL = -32001
JSONRPC_UNAVAILABLE = -32002


@dataclass
class Refusal(Exception):
    """A call the sidecar will not forward."""

    code: str
    detail: str
    reasons: list[str] = field(default_factory=list)
    decision_id: str | None = None
    approval_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.code not in PROBLEMS:
            raise ValueError(f"unknown refusal code {self.code!r}")
        super().__init__(f"{self.code}: {self.detail}")

    @property
    def status(self) -> int:
        return PROBLEMS[self.code][0]

    @property
    def title(self) -> str:
        return PROBLEMS[self.code][1]

    def problem(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": PROBLEM_TYPE_BASE + self.code,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
            "reasons": list(self.reasons),
        }
        if self.decision_id:
            body["decision_id"] = self.decision_id
        if self.approval_id:
            body["approval_id"] = self.approval_id
        body.update(self.extra)
        return body

    def problem_json(self) -> bytes:
        return json.dumps(self.problem(), separators=(",", ":")).encode()

    def jsonrpc_error(self, request_id: Any) -> dict[str, Any]:
        """The JSON-RPC 2.0 error response an MCP client understands."""
        if self.code in JSONRPC_CODES:
            number = JSONRPC_CODES[self.code]
        elif self.status >= 500:
            number = JSONRPC_UNAVAILABLE
        else:
            number = JSONRPC_REFUSAL
        reasons = "; ".join(self.reasons)
        message = f"{self.title}: {reasons}" if reasons else f"{self.title}: {self.detail}"
        return {
            "jsonrpc": "2.0",
            "id": request_id,
            "error": {"code": number, "message": message, "data": self.problem()},
        }
