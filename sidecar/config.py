"""The sidecar's one YAML config file, validated before any listener opens.

Every error names the file and the key path, e.g.
``sidecar.yaml: routes[2].upstream: not an http(s) URL``. This module holds what the rest of the
sidecar uses (the dataclasses below); the file's definition, which validates it and produces its
JSON Schema (docs/config.schema.json, `agent-sidecar config schema`), is sidecar/config_schema.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .secret import Secret
from .approvals.preview import DEFAULT_HIGHLIGHT_FIELDS, DEFAULT_MASK_FIELDS, DEFAULT_PREVIEW_BYTES
from .tasks.measures import Measure

# Never forwarded from the agent, on any route.
FIXED_CREDENTIAL_HEADERS = ("authorization", "proxy-authorization", "cookie")
# Headers that carry a credential by common convention: stripped on every route unless the route
# lists one in credential.pass_headers. Each names a key or token that grants authority by itself:
# generic API keys and tokens, AWS STS session tokens, Google and Azure API-management keys, Azure
# Functions keys, GitLab, Vault, Consul and Shopify tokens. CSRF tokens are left out: they grant
# nothing without the session cookie, which is always stripped.
CONVENTIONAL_CREDENTIAL_HEADERS = (
    "x-api-key", "api-key", "apikey", "x-api-token", "x-api-secret", "x-auth-token", "x-auth-key",
    "x-access-token", "x-session-token", "x-amz-security-token", "x-goog-api-key",
    "ocp-apim-subscription-key", "x-functions-key", "private-token", "job-token", "x-vault-token",
    "x-consul-token", "x-shopify-access-token",
)
DEFAULT_CREDENTIAL_HEADERS = FIXED_CREDENTIAL_HEADERS + CONVENTIONAL_CREDENTIAL_HEADERS
# Methods a route accepts unless it lists its own; TRACE, CONNECT and WebDAV methods never by default.
DEFAULT_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
PROTOCOLS = ("http", "mcp")
CONTENT_CODINGS = ("gzip", "deflate")


class ConfigError(Exception):
    """A config problem, already phrased as ``file: key.path: what is wrong``."""


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class RouteMatch:
    path_prefix: str | None = None
    host: str | None = None
    host_path_prefix: str | None = None


@dataclass(frozen=True)
class RouteCredential:
    mode: str = "jwt"  # jwt | static | none
    header: str = "Authorization"
    scheme: str = "Bearer"
    static_key_file: Path | None = None
    strip_headers: tuple[str, ...] = ()
    pass_headers: tuple[str, ...] = ()  # conventional credential headers this route forwards (lower-case)


MCP_HINTS = ("readOnlyHint", "destructiveHint", "idempotentHint", "openWorldHint")


@dataclass(frozen=True)
class McpOptions:
    """How an MCP route answers refusals and which tool hints it believes."""

    refusal: str = "tool_result"  # tool_result | jsonrpc_error: how a refused tools/call is answered
    tools: dict[str, dict[str, bool]] = field(default_factory=dict)  # hints pinned by the operator, by tool name
    trust_server_annotations: bool = False  # False: a server's hints may only make a call stricter


@dataclass(frozen=True)
class Route:
    name: str
    match: RouteMatch
    upstream: str
    labels: dict[str, Any] = field(default_factory=dict)
    credential: RouteCredential = field(default_factory=RouteCredential)
    allow_tunnel: bool = False
    intercept_tls: bool = False  # CONNECT and redirected TLS to match.host are terminated with a pod-CA leaf (issue 18)
    tls_verify: bool = True
    ca_bundle: Path | None = None
    timeout_seconds: float = 30.0
    measures: tuple[Measure, ...] = ()  # route-configured; the task history adds amount/records defaults
    methods: frozenset[str] = frozenset(DEFAULT_METHODS)
    protocol: str = "http"  # http | mcp: JSON-RPC is parsed on mcp routes only, never sniffed from a body
    content_encodings: tuple[str, ...] = ()  # request codings decoded (once) and judged; any other is refused
    mcp: McpOptions = field(default_factory=McpOptions)

    @property
    def is_mcp(self) -> bool:
        return self.protocol == "mcp"

    @property
    def credential_headers(self) -> frozenset[str]:
        """Every header name the agent must never be able to set for this route."""
        names = set(DEFAULT_CREDENTIAL_HEADERS) - set(self.credential.pass_headers)
        names.add(self.credential.header.lower())
        names.update(h.lower() for h in self.credential.strip_headers)
        return frozenset(names)


@dataclass(frozen=True)
class ConnectionLimits:
    """Bounds on what a slow or greedy client can hold on the proxy listener."""

    header_timeout_seconds: float = 10.0  # first byte of a request head to its end
    body_timeout_seconds: float = 30.0  # to read the whole body
    idle_timeout_seconds: float = 30.0  # a kept-alive connection with no request
    max_connections: int = 1024


@dataclass(frozen=True)
class PolicyConfig:
    engine: str = "embedded"  # embedded | rest
    decision_path: str = "sidecar/authz/decision"
    rego_dir: Path = Path("rego")
    timeout_ms: int = 250
    rest_url: str = "http://127.0.0.1:8181"
    # Engines evaluating in parallel, one per thread. One by default: on the two cores a sidecar gets,
    # a second engine competes with the event loop and doubles the Go heap (docs/performance.md).
    embedded_workers: int = 1
    # Standby engines that take over from one whose evaluation overran its deadline (issue 15).
    embedded_spare_engines: int = 1
    # Policy lifecycle (issue 19, docs/policy.md): the embedded engine follows its source.
    reload_seconds: float = 1.0  # how often the source is polled; 0: only on SIGHUP or POST /v1/policy/reload
    bundle: str | None = None  # an OPA bundle (.tar.gz) path or http(s) URL, instead of rego_dir
    bundle_public_key: Path | None = None  # PEM; when set, only bundles signed with its private key load
    bundle_key_id: str | None = None  # when set, the signature's kid must name it
    bundle_name: str = "authz"  # the name decisions give their policy (OPA's decision-log "bundles")
    shadow: str | None = None  # a candidate policy (directory or bundle) evaluated beside the live one, never enforced


@dataclass(frozen=True)
class CredentialsConfig:
    issuer: str = "agent-sidecar"
    keys_dir: Path | None = None  # None: a development key generated into state_dir
    algorithm: str = "ES256"
    max_ttl_seconds: int = 300
    default_ttl_seconds: int = 60
    reload_seconds: float = 1.0


@dataclass(frozen=True)
class IdentityConfig:
    static: str | None = "spiffe://local/agent/dev"
    token_file: Path | None = None
    jwks: str | None = None
    audience: str | None = None
    issuer: str | None = None


@dataclass(frozen=True)
class StoreConfig:
    """Shared by tasks, the revocation list and approvals: sqlite (one pod) or redis (replicas share)."""

    backend: str = "sqlite"  # sqlite | redis
    sqlite_path: Path | None = None  # None: <state_dir>/sidecar.db
    redis_url: str | None = None


@dataclass(frozen=True)
class ApproversConfig:
    """Who may approve: OIDC JWTs verified against this JWKS (file or URL)."""

    jwks: str  # a file path (made absolute) or an http(s) URL
    issuer: str
    audience: str
    group_claim: str = "groups"


@dataclass(frozen=True)
class WebhookConfig:
    url: str
    max_attempts: int = 5
    backoff_seconds: float = 0.5
    timeout_seconds: float = 5.0
    queue_size: int = 1000


@dataclass(frozen=True)
class ApprovalsConfig:
    max_wait_seconds: int = 60  # the cap on Prefer: wait=N
    default_expiry_seconds: int = 900  # when the policy's decision names none
    # Approvals waiting for a human at once; one more held call is refused too_many_pending_approvals.
    max_pending_per_task: int = 8  # calls outside any task count as one task of their agent
    max_pending_per_agent: int = 32  # over all the agent's tasks: it can open tasks at will
    page_url: str | None = None  # the approver page as approvers reach it; None: http://<admin listener>/ui/
    approvers: ApproversConfig | None = None  # None: nobody can approve through the API
    webhook: WebhookConfig | None = None
    # What the approver sees of a held call's body (docs/approvals.md, sidecar/approvals/preview.py).
    body_preview_bytes: int = DEFAULT_PREVIEW_BYTES  # 0: size and hash only
    mask_fields: tuple[str, ...] = DEFAULT_MASK_FIELDS  # the built-in names plus the configured ones
    highlight_fields: tuple[str, ...] = DEFAULT_HIGHLIGHT_FIELDS  # the configured list replaces the default


@dataclass(frozen=True)
class IntrospectionConfig:
    tokens: tuple[Secret, ...] = ()
    tokens_file: Path | None = None  # one bearer token per line, re-read when it changes


@dataclass(frozen=True)
class DelegationConfig:
    jwks: str | None = None  # file or URL of the parent sidecars' keys; None: X-Agent-Delegation is refused
    issuers: tuple[str, ...] = ()
    audiences: tuple[str, ...] = ()
    max_depth: int = 8


@dataclass(frozen=True)
class AuditShipConfig:
    """Shipping audit events to an HTTP sink in OPA's decision-log upload format."""

    url: str
    resource: str = "/logs"
    interval_seconds: float = 5.0
    queue_size: int = 10_000
    queue_bytes: int = 64 * 1024 * 1024  # of embedded policy input; past it the oldest events are dropped too
    max_batch: int = 1_000
    backoff_min_seconds: float = 0.5
    backoff_max_seconds: float = 60.0
    timeout_seconds: float = 10.0
    bearer_token_file: Path | None = None


@dataclass(frozen=True)
class AuditConfig:
    path: Path | None = None  # None: <state_dir>/audit.jsonl
    fail_closed: bool = True
    rotate_bytes: int = 64 * 1024 * 1024  # 0: never rotate
    queue_size: int = 10_000
    queue_bytes: int = 64 * 1024 * 1024  # of embedded policy input; past it appends are refused too
    ship: AuditShipConfig | None = None


@dataclass(frozen=True)
class TlsInterceptionConfig:
    """The pod-local CA for routes with intercept_tls (issue 18). No files: a development CA in state_dir."""

    ca_cert: Path | None = None
    ca_key: Path | None = None
    leaf_cache_size: int = 1024  # leaf certificates kept in memory (LRU); never written to disk
    handshake_timeout_seconds: float = 10.0


@dataclass(frozen=True)
class Config:
    source: Path
    proxy: Listen = Listen("127.0.0.1", 15001)
    admin: Listen = Listen("127.0.0.1", 15000)
    metrics: Listen = Listen("127.0.0.1", 15090)
    state_dir: Path = Path(".state")
    max_body_bytes: int = 1024 * 1024
    max_in_flight: int = 4096
    max_body_bytes_in_flight: int = 16 * 1024 * 1024
    connections: ConnectionLimits = field(default_factory=lambda: ConnectionLimits())
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    credentials: CredentialsConfig = field(default_factory=CredentialsConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    approvals: ApprovalsConfig = field(default_factory=ApprovalsConfig)
    introspection: IntrospectionConfig = field(default_factory=IntrospectionConfig)
    delegation: DelegationConfig = field(default_factory=DelegationConfig)
    tls_interception: TlsInterceptionConfig = field(default_factory=TlsInterceptionConfig)
    routes: tuple[Route, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def audit_path(self) -> Path:
        return self.audit.path or self.state_dir / "audit.jsonl"

    @property
    def sqlite_path(self) -> Path:
        return self.store.sqlite_path or self.state_dir / "sidecar.db"


def parse_config(data: Any, source: Path) -> Config:
    """Validate a parsed YAML document; raise ConfigError naming file and key.

    The file's definition (every key, its type, default, limits and checks) is the pydantic models in
    sidecar/config_schema.py, imported here and not at module import: only loading a config pays for pydantic.
    """
    from .config_schema import parse

    return parse(data, source)


def load_config(path: Path) -> Config:
    """Read and validate a config file; every failure is a ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path.name}: not valid YAML{where}") from None
    return parse_config(data, path)
