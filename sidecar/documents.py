"""The documents that cross module boundaries on the request path.

intercept -> InterceptedCall -> context -> policy input (a JsonDocument, schema input.v2)
decide -> Decision -> enforce -> mint -> MintedCredential -> forward -> record
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .config import Route
from .secret import Secret

# tls_intercept: decrypted after a CONNECT; transparent_tls: decrypted from a redirected TLS connection (issue 18).
Mode = Literal["route_prefix", "forward_proxy", "connect", "transparent", "tls_intercept", "transparent_tls"]
Outcome = Literal["allow", "deny", "hold"]


@dataclass(frozen=True)
class McpCall:
    """One JSON-RPC request of an MCP message (a batch holds several)."""

    method: str
    id: Any
    tool: str | None
    arguments: dict[str, Any] | None
    batch_index: int | None = None
    batch_size: int | None = None

    @property
    def is_request(self) -> bool:
        """Whether the server acts on it and answers (a tools/call without an id included): not a
        notification, not a response the client sends back."""
        return self.method != "(response)" and not self.method.startswith("notifications/")

    def as_input(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"method": self.method, "id": self.id, "tool": self.tool, "arguments": self.arguments}
        if self.batch_index is not None:
            doc["batch_index"] = self.batch_index
            doc["batch_size"] = self.batch_size
        return doc


@dataclass(frozen=True)
class InterceptedCall:
    """What the agent asked for, parsed once: the one request object every later step reads.

    ``path`` and ``query_string`` are canonical (sidecar/proxy/canonical.py) and are what
    the upstream receives byte for byte; ``body`` is what is forwarded and hashed. The
    policy input, the credential's request binding, the approval binding and the audit
    event are all derived from these fields; nothing rewrites them after the decision.
    """

    route: Route
    mode: Mode
    method: str
    scheme: str
    host: str
    port: int
    path: str  # on the upstream (the route's base path + the canonical path), exactly as sent
    query_string: str  # canonical, exactly as sent; "" when there is none
    query: dict[str, list[str]]
    headers: tuple[tuple[str, str], ...]  # forwardable, original case, in order
    body: bytes
    body_json: Any  # the body as the policy sees it: parsed JSON, a form as an object, or None
    body_sha256: str
    content_type: str
    mcp_calls: tuple[McpCall, ...] = ()
    task_id: str | None = None
    approval_id: str | None = None
    prefer_wait_seconds: float | None = None
    delegation: Secret | None = None  # X-Agent-Delegation: a parent sidecar's credential, verified in context
    body_readable: bool = True  # False when the body is neither JSON nor a form: the policy cannot see into it
    original_destination: str | None = None  # transparent modes: "ip:port" the connection was going to (SO_ORIGINAL_DST)

    @property
    def target_url(self) -> str:
        """The upstream URL this call is forwarded to."""
        default_port = 443 if self.scheme == "https" else 80
        authority = self.host if self.port == default_port else f"{self.host}:{self.port}"
        if ":" in self.host and not self.host.startswith("["):
            authority = f"[{self.host}]" if self.port == default_port else f"[{self.host}]:{self.port}"
        query = f"?{self.query_string}" if self.query_string else ""
        return f"{self.scheme}://{authority}{self.path}{query}"

    @property
    def path_and_query(self) -> str:
        return f"{self.path}?{self.query_string}" if self.query_string else self.path

    @property
    def is_mcp(self) -> bool:
        return bool(self.mcp_calls)


@dataclass(frozen=True)
class CredentialSpec:
    audience: str | None = None
    scopes: tuple[str, ...] = ()
    ttl_seconds: int | None = None


@dataclass(frozen=True)
class ApprovalSpec:
    approvers: int = 1
    group: str | None = None
    expires_in_seconds: int = 900


@dataclass(frozen=True)
class Decision:
    """A validated policy decision."""

    decision_id: str
    allow: bool
    require_approval: bool
    reasons: tuple[str, ...]
    risk: str = "low"
    credential: CredentialSpec = field(default_factory=CredentialSpec)
    approval: ApprovalSpec = field(default_factory=ApprovalSpec)
    obligations: tuple[str, ...] = ()
    rules: tuple[str, ...] = ()
    measures: Mapping[str, float] = field(default_factory=dict)  # what the call adds to its task, as judged
    result: dict[str, Any] = field(default_factory=dict)  # the raw result, for the audit log
    eval_ns: int = 0
    bundles: Mapping[str, str] = field(default_factory=dict)  # bundle name -> revision of the policy that decided

    @property
    def outcome(self) -> Outcome:
        if self.require_approval:
            return "hold"
        return "allow" if self.allow else "deny"


@dataclass(frozen=True)
class MintedCredential:
    """A credential injected into exactly one upstream call. Only the jti is ever logged."""

    header: str
    value: Secret
    jti: str | None
    expires_at: int | None
    kid: str | None = None
