"""The sidecar's one YAML config file, validated before any listener opens.

Every error names the file and the key path, e.g.
``sidecar.yaml: routes[2].upstream: not an http(s) URL``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

from .secret import Secret
from .approvals.preview import (DEFAULT_HIGHLIGHT_FIELDS, DEFAULT_MASK_FIELDS, DEFAULT_PREVIEW_BYTES,
                                MAX_PREVIEW_BYTES)
from .tasks.measures import (MAX_MEASURES_PER_ROUTE, MAX_PATHS_PER_MEASURE, MEASURE_NAME, Measure,
                              MeasurePath, MeasurePathError, parse_path)

T = TypeVar("T")

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


# ---------------------------------------------------------------- parsing helpers


class _Reader:
    """Walks the YAML tree and reports errors with ``file: key.path``."""

    def __init__(self, source: Path) -> None:
        self.source = source

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source.name}: {key or '(root)'}: {message}")

    def mapping(self, value: Any, key: str, allowed: set[str]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, "must be a mapping")
        for name in value:
            if name not in allowed:
                raise self.fail(f"{key}.{name}" if key else str(name), "unknown key")
        return value

    def typed(self, section: dict[str, Any], key: str, name: str, kind: type[T], default: T) -> T:
        if name not in section or section[name] is None:
            return default
        value = section[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.fail(_join(key, name), f"must be {_KIND_NAMES.get(kind, kind.__name__)}")
        return value

    def positive(self, section: dict[str, Any], key: str, name: str, default: int) -> int:
        value = self.typed(section, key, name, int, default)
        if value <= 0:
            raise self.fail(_join(key, name), "must be a positive integer")
        return value

    def choice(self, section: dict[str, Any], key: str, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.typed(section, key, name, str, default)
        if value not in choices:
            raise self.fail(_join(key, name), f"must be one of {', '.join(choices)}")
        return value

    def path(self, section: dict[str, Any], key: str, name: str, default: Path | None) -> Path | None:
        value = self.typed(section, key, name, str, "")
        if not value:
            return default
        candidate = Path(value)
        return candidate if candidate.is_absolute() else Path(os.path.normpath(self.source.parent / candidate))


_KIND_NAMES: dict[type, str] = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


_LISTEN = re.compile(r"^(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]*):(?P<port>\d{1,5})$")
_ROUTE_NAME = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,62}$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def _listen(reader: _Reader, section: dict[str, Any], name: str, default: Listen) -> Listen:
    value = section.get(name)
    if value is None:
        return default
    key = f"listeners.{name}"
    match = _LISTEN.match(str(value))
    if not isinstance(value, str) or not match:
        raise reader.fail(key, "must be HOST:PORT")
    port = int(match["port"])
    if port > 65535:
        raise reader.fail(key, "port out of range")
    return Listen(match["host"].strip("[]") or "0.0.0.0", port)


def _http_url(reader: _Reader, value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise reader.fail(key, "not an http(s) URL")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise reader.fail(key, "not an http(s) URL")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise reader.fail(key, "must not carry a query, fragment or user info")
    return value.rstrip("/")


def _prefix(reader: _Reader, value: Any, key: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith("/") or "//" in value:
        raise reader.fail(key, "must be a path starting with /")
    return value.rstrip("/") or "/"


def _route(reader: _Reader, value: Any, index: int) -> Route:
    key = f"routes[{index}]"
    section = reader.mapping(
        value, key,
        {"name", "match", "upstream", "labels", "credential", "allow_tunnel", "intercept_tls", "tls", "timeout_seconds", "measures",
         "methods", "protocol", "content_encodings", "mcp"},
    )
    name = section.get("name")
    if not isinstance(name, str) or not _ROUTE_NAME.match(name):
        raise reader.fail(f"{key}.name", "must be lower-case letters, digits, - or _")
    if "upstream" not in section:
        raise reader.fail(f"{key}.upstream", "is required")
    upstream = _http_url(reader, section["upstream"], f"{key}.upstream")
    match_section = reader.mapping(section.get("match"), f"{key}.match", {"path_prefix", "host", "host_path_prefix"})
    host = match_section.get("host")
    if host is not None and (not isinstance(host, str) or not re.match(r"^[A-Za-z0-9.\-]+(:\d+)?$", host)):
        raise reader.fail(f"{key}.match.host", "must be a host name, optionally with :port")
    match = RouteMatch(
        path_prefix=_prefix(reader, match_section.get("path_prefix"), f"{key}.match.path_prefix"),
        host=host.lower() if host else None,
        host_path_prefix=_prefix(reader, match_section.get("host_path_prefix"), f"{key}.match.host_path_prefix"),
    )
    if match.path_prefix is None and match.host is None:
        raise reader.fail(f"{key}.match", "needs path_prefix or host")
    if match.path_prefix == "/":
        raise reader.fail(f"{key}.match.path_prefix", "must not be / (it would shadow every route)")
    labels = section.get("labels") or {}
    if not isinstance(labels, dict) or not all(isinstance(k, str) for k in labels):
        raise reader.fail(f"{key}.labels", "must be a mapping of names to values")
    protocol = _protocol(reader, section, labels, key)
    if protocol == "mcp":
        labels = {**labels, "protocol": "mcp"}  # the policy sees what the config says
    tls = reader.mapping(section.get("tls"), f"{key}.tls", {"verify", "ca_bundle"})
    ca_bundle = reader.path(tls, f"{key}.tls", "ca_bundle", None)
    if ca_bundle is not None and not ca_bundle.is_file():
        raise reader.fail(f"{key}.tls.ca_bundle", f"no such file: {ca_bundle}")
    return Route(
        name=name,
        match=match,
        upstream=upstream,
        labels=dict(labels),
        credential=_route_credential(reader, section.get("credential"), f"{key}.credential"),
        allow_tunnel=reader.typed(section, key, "allow_tunnel", bool, False),
        intercept_tls=_intercept_tls(reader, section, key, match),
        tls_verify=reader.typed(tls, f"{key}.tls", "verify", bool, True),
        ca_bundle=ca_bundle,
        timeout_seconds=reader.typed(section, key, "timeout_seconds", float, 30.0),
        measures=_measures(reader, section.get("measures"), f"{key}.measures"),
        methods=_methods(reader, section.get("methods"), f"{key}.methods"),
        protocol=protocol,
        content_encodings=_codings(reader, section.get("content_encodings"), f"{key}.content_encodings"),
        mcp=_mcp_options(reader, section.get("mcp"), f"{key}.mcp", protocol),
    )


def _intercept_tls(reader: _Reader, section: dict[str, Any], key: str, match: RouteMatch) -> bool:
    intercept = reader.typed(section, key, "intercept_tls", bool, False)
    if intercept and match.host is None:
        raise reader.fail(f"{key}.intercept_tls", "needs match.host (the host whose TLS is intercepted)")
    tls = section.get("tls")
    if intercept and isinstance(tls, dict) and tls.get("verify") is False:
        raise reader.fail(f"{key}.tls.verify", "cannot be false with intercept_tls: the agent's TLS is ended at the "
                                               "sidecar, so the sidecar's own TLS to the upstream must be verified")
    return intercept


def _mcp_options(reader: _Reader, value: Any, key: str, protocol: str) -> McpOptions:
    if value is None:
        return McpOptions()
    if protocol != "mcp":
        raise reader.fail(key, "is only for routes with protocol: mcp")
    section = reader.mapping(value, key, {"refusal", "tools", "trust_server_annotations"})
    tools = section.get("tools") or {}
    if not isinstance(tools, dict):
        raise reader.fail(f"{key}.tools", "must be a mapping of tool names to hints")
    pinned: dict[str, dict[str, bool]] = {}
    for name, hints in tools.items():
        hints_section = reader.mapping(hints, f"{key}.tools.{name}", set(MCP_HINTS))
        if not all(isinstance(v, bool) for v in hints_section.values()):
            raise reader.fail(f"{key}.tools.{name}", "hints are true or false")
        pinned[str(name)] = dict(hints_section)
    return McpOptions(refusal=reader.choice(section, key, "refusal", ("tool_result", "jsonrpc_error"), "tool_result"),
                      tools=pinned,
                      trust_server_annotations=reader.typed(section, key, "trust_server_annotations", bool, False))


def _protocol(reader: _Reader, section: dict[str, Any], labels: dict[str, Any], key: str) -> str:
    """``protocol: mcp`` (or, as before, the label ``protocol: mcp``) makes a route MCP; both must agree."""
    protocol = reader.choice(section, key, "protocol", PROTOCOLS, "http") if "protocol" in section else ""
    label = labels.get("protocol")
    if label is not None and str(label).lower() == "mcp":
        if protocol == "http":
            raise reader.fail(f"{key}.protocol", "is http but labels.protocol says mcp")
        return "mcp"
    return protocol or "http"


def _methods(reader: _Reader, value: Any, key: str) -> frozenset[str]:
    if value is None:
        return frozenset(DEFAULT_METHODS)
    if (not isinstance(value, list) or not value
            or not all(isinstance(m, str) and re.fullmatch(r"[A-Z]{1,20}", m) for m in value)):
        raise reader.fail(key, "must be a list of upper-case method names such as GET")
    if "CONNECT" in value or "TRACE" in value:
        raise reader.fail(key, "CONNECT and TRACE cannot be listed (CONNECT is allow_tunnel)")
    return frozenset(value)


def _codings(reader: _Reader, value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(v in CONTENT_CODINGS for v in value):
        raise reader.fail(key, f"must be a list of {', '.join(CONTENT_CODINGS)}")
    return tuple(value)


def _measures(reader: _Reader, value: Any, key: str) -> tuple[Measure, ...]:
    """``measures: {name: [JSON path, ...]}``; the path syntax is in sidecar/tasks/measures.py."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise reader.fail(key, "must be a mapping of measure names to lists of JSON paths")
    if len(value) > MAX_MEASURES_PER_ROUTE:
        raise reader.fail(key, f"at most {MAX_MEASURES_PER_ROUTE} measures per route")
    measures = []
    for name, paths in value.items():
        if not isinstance(name, str) or not MEASURE_NAME.match(name):
            raise reader.fail(f"{key}.{name}", "a measure name is lower-case letters, digits and _ (at most 32)")
        if not isinstance(paths, list) or not paths or len(paths) > MAX_PATHS_PER_MEASURE:
            raise reader.fail(f"{key}.{name}", f"must be a list of 1 to {MAX_PATHS_PER_MEASURE} JSON paths")
        measures.append(Measure(name, tuple(_measure_path(reader, p, f"{key}.{name}[{i}]") for i, p in enumerate(paths))))
    return tuple(measures)


def _measure_path(reader: _Reader, value: Any, key: str) -> MeasurePath:
    if not isinstance(value, str):
        raise reader.fail(key, "must be a string such as $.amount")
    try:
        return parse_path(value)
    except MeasurePathError as exc:
        raise reader.fail(key, str(exc)) from None


def _route_credential(reader: _Reader, value: Any, key: str) -> RouteCredential:
    section = reader.mapping(value, key, {"mode", "header", "scheme", "static_key_file", "strip_headers",
                                          "pass_headers"})
    mode = reader.choice(section, key, "mode", ("jwt", "static", "none"), "jwt")
    header = reader.typed(section, key, "header", str, "Authorization")
    if not _HEADER_NAME.match(header):
        raise reader.fail(f"{key}.header", "not a valid header name")
    strip = section.get("strip_headers") or []
    if not isinstance(strip, list) or not all(isinstance(h, str) and _HEADER_NAME.match(h) for h in strip):
        raise reader.fail(f"{key}.strip_headers", "must be a list of header names")
    passed = section.get("pass_headers") or []
    if not isinstance(passed, list) or not all(isinstance(h, str) for h in passed):
        raise reader.fail(f"{key}.pass_headers", "must be a list of header names")
    for name in passed:
        if name.lower() not in CONVENTIONAL_CREDENTIAL_HEADERS:
            raise reader.fail(f"{key}.pass_headers", f"{name} is not one of the conventional credential headers")
        if name.lower() == header.lower() or name.lower() in (h.lower() for h in strip):
            raise reader.fail(f"{key}.pass_headers", f"{name} is also the route's credential header or in strip_headers")
    static_key_file = reader.path(section, key, "static_key_file", None)
    if mode == "static" and static_key_file is None:
        raise reader.fail(f"{key}.static_key_file", "is required when mode is static")
    return RouteCredential(
        mode=mode,
        header=header,
        scheme=reader.typed(section, key, "scheme", str, "Bearer" if header.lower() == "authorization" else ""),
        static_key_file=static_key_file,
        strip_headers=tuple(strip),
        pass_headers=tuple(sorted({h.lower() for h in passed})),
    )


def _check_unique_routes(reader: _Reader, routes: list[Route]) -> None:
    seen: dict[str, int] = {}
    prefixes: dict[str, int] = {}
    hosts: dict[tuple[str, str | None], int] = {}
    for index, route in enumerate(routes):
        if route.name in seen:
            raise reader.fail(f"routes[{index}].name", f"duplicates routes[{seen[route.name]}]")
        seen[route.name] = index
        if route.match.path_prefix:
            if route.match.path_prefix in prefixes:
                raise reader.fail(f"routes[{index}].match.path_prefix", f"duplicates routes[{prefixes[route.match.path_prefix]}]")
            prefixes[route.match.path_prefix] = index
        if route.match.host:
            host_key = (route.match.host, route.match.host_path_prefix)
            if host_key in hosts:
                raise reader.fail(f"routes[{index}].match.host", f"duplicates routes[{hosts[host_key]}]")
            hosts[host_key] = index


def _reload_seconds(reader: _Reader, credentials: dict[str, Any]) -> float:
    value = reader.typed(credentials, "credentials", "reload_seconds", float, 1.0)
    if not 0.05 <= value <= 60:
        raise reader.fail("credentials.reload_seconds", "must be between 0.05 and 60")
    return value


def _store(reader: _Reader, value: Any) -> StoreConfig:
    section = reader.mapping(value, "store", {"backend", "sqlite_path", "redis_url"})
    backend = reader.choice(section, "store", "backend", ("sqlite", "redis"), "sqlite")
    redis_url = reader.typed(section, "store", "redis_url", str, "") or None
    if redis_url is not None and urlsplit(redis_url).scheme not in ("redis", "rediss", "unix"):
        raise reader.fail("store.redis_url", "must be a redis://, rediss:// or unix:// URL")
    if backend == "redis" and redis_url is None:
        raise reader.fail("store.redis_url", "is required when backend is redis")
    return StoreConfig(backend=backend, sqlite_path=reader.path(section, "store", "sqlite_path", None), redis_url=redis_url)


def _audit(reader: _Reader, value: Any) -> AuditConfig:
    section = reader.mapping(value, "audit", {"path", "fail_closed", "rotate_bytes", "queue_size", "ship"})
    rotate_bytes = reader.typed(section, "audit", "rotate_bytes", int, AuditConfig.rotate_bytes)
    if rotate_bytes != 0 and rotate_bytes < 4096:
        raise reader.fail("audit.rotate_bytes", "must be 0 (never rotate) or at least 4096")
    return AuditConfig(
        path=reader.path(section, "audit", "path", None),
        fail_closed=reader.typed(section, "audit", "fail_closed", bool, True),
        rotate_bytes=rotate_bytes,
        queue_size=reader.positive(section, "audit", "queue_size", AuditConfig.queue_size),
        ship=_audit_ship(reader, section.get("ship")) if section.get("ship") is not None else None,
    )


def _audit_ship(reader: _Reader, value: Any) -> AuditShipConfig:
    key = "audit.ship"
    section = reader.mapping(value, key, {"url", "resource", "interval_seconds", "queue_size", "max_batch",
                                          "backoff_min_seconds", "backoff_max_seconds", "timeout_seconds",
                                          "bearer_token_file"})
    if "url" not in section:
        raise reader.fail(f"{key}.url", "is required")
    resource = reader.typed(section, key, "resource", str, "/logs")
    if not resource.startswith("/") or "?" in resource or "#" in resource:
        raise reader.fail(f"{key}.resource", "must be a path starting with /")
    seconds = {name: reader.typed(section, key, name, float, default) for name, default in (
        ("interval_seconds", 5.0), ("backoff_min_seconds", 0.5), ("backoff_max_seconds", 60.0),
        ("timeout_seconds", 10.0))}
    for name, number in seconds.items():
        if number <= 0:
            raise reader.fail(f"{key}.{name}", "must be a positive number")
    if seconds["backoff_max_seconds"] < seconds["backoff_min_seconds"]:
        raise reader.fail(f"{key}.backoff_max_seconds", "must not be less than backoff_min_seconds")
    token_file = reader.path(section, key, "bearer_token_file", None)
    if token_file is not None and not token_file.is_file():
        raise reader.fail(f"{key}.bearer_token_file", f"no such file: {token_file}")
    return AuditShipConfig(
        url=_http_url(reader, section["url"], f"{key}.url"),
        resource=resource,
        queue_size=reader.positive(section, key, "queue_size", 10_000),
        max_batch=reader.positive(section, key, "max_batch", 1_000),
        bearer_token_file=token_file,
        **seconds,
    )


def _string_list(reader: _Reader, section: dict[str, Any], key: str) -> tuple[str, ...]:
    value = section.get(key.rsplit(".", 1)[-1]) or []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise reader.fail(key, "must be a list of non-empty strings")
    return tuple(value)


def _introspection(reader: _Reader, value: Any) -> IntrospectionConfig:
    section = reader.mapping(value, "introspection", {"tokens", "tokens_file"})
    tokens = _string_list(reader, section, "introspection.tokens")
    if any(len(t) < 16 for t in tokens):
        raise reader.fail("introspection.tokens", "each token needs at least 16 characters")
    tokens_file = reader.path(section, "introspection", "tokens_file", None)
    if tokens_file is not None and not tokens_file.is_file():
        raise reader.fail("introspection.tokens_file", f"no such file: {tokens_file}")
    return IntrospectionConfig(tokens=tuple(Secret(t) for t in tokens), tokens_file=tokens_file)


def _delegation(reader: _Reader, value: Any) -> DelegationConfig:
    section = reader.mapping(value, "delegation", {"jwks", "issuers", "audiences", "max_depth"})
    jwks = reader.typed(section, "delegation", "jwks", str, "") or None
    issuers = _string_list(reader, section, "delegation.issuers")
    audiences = _string_list(reader, section, "delegation.audiences")
    if jwks is not None and not issuers:
        raise reader.fail("delegation.issuers", "is required with jwks (the issuers of the parent sidecars)")
    if jwks is not None and not audiences:
        raise reader.fail("delegation.audiences", "is required with jwks (the audiences this agent is called as)")
    if jwks is not None and not jwks.startswith(("http://", "https://")):
        path = Path(jwks) if Path(jwks).is_absolute() else reader.source.parent / jwks
        if not path.is_file():
            raise reader.fail("delegation.jwks", f"no such file: {path}")
        jwks = str(path)
    return DelegationConfig(jwks=jwks, issuers=issuers, audiences=audiences,
                            max_depth=reader.positive(section, "delegation", "max_depth", 8))


def _approvals(reader: _Reader, value: Any) -> ApprovalsConfig:
    key = "approvals"
    section = reader.mapping(value, key, {"max_wait_seconds", "default_expiry_seconds", "page_url", "approvers", "webhook",
                                          "body_preview_bytes", "mask_fields", "highlight_fields"})
    max_wait = reader.typed(section, key, "max_wait_seconds", int, 60)
    if not 0 <= max_wait <= 3600:
        raise reader.fail("approvals.max_wait_seconds", "must be between 0 and 3600")
    expiry = reader.positive(section, key, "default_expiry_seconds", 900)
    if expiry > 604800:
        raise reader.fail("approvals.default_expiry_seconds", "must be at most 604800 (a week)")
    page_url = _http_url(reader, section["page_url"], "approvals.page_url") + "/" if section.get("page_url") else None
    preview_bytes = reader.typed(section, key, "body_preview_bytes", int, DEFAULT_PREVIEW_BYTES)
    if not 0 <= preview_bytes <= MAX_PREVIEW_BYTES:
        raise reader.fail("approvals.body_preview_bytes", f"must be between 0 (size and hash only) and {MAX_PREVIEW_BYTES}")
    mask = _string_list(reader, section, "approvals.mask_fields")
    highlight = _string_list(reader, section, "approvals.highlight_fields") if "highlight_fields" in section else None
    return ApprovalsConfig(max_wait_seconds=max_wait, default_expiry_seconds=expiry, page_url=page_url,
                           approvers=_approvers(reader, section.get("approvers")),
                           webhook=_webhook(reader, section.get("webhook")),
                           body_preview_bytes=preview_bytes,
                           mask_fields=DEFAULT_MASK_FIELDS + tuple(m for m in mask if m not in DEFAULT_MASK_FIELDS),
                           highlight_fields=DEFAULT_HIGHLIGHT_FIELDS if highlight is None else highlight)


def _approvers(reader: _Reader, value: Any) -> ApproversConfig | None:
    key = "approvals.approvers"
    if value is None:
        return None
    section = reader.mapping(value, key, {"jwks", "issuer", "audience", "group_claim"})
    for name in ("jwks", "issuer", "audience"):
        if not reader.typed(section, key, name, str, ""):
            raise reader.fail(f"{key}.{name}", "is required")
    jwks: str = section["jwks"]
    if jwks.startswith(("http://", "https://")):
        jwks = _http_url(reader, jwks, f"{key}.jwks")
    else:
        path = Path(jwks) if Path(jwks).is_absolute() else reader.source.parent / jwks
        if not path.is_file():
            raise reader.fail(f"{key}.jwks", f"no such file: {path}")
        jwks = str(path)
    return ApproversConfig(jwks=jwks, issuer=section["issuer"], audience=section["audience"],
                           group_claim=reader.typed(section, key, "group_claim", str, "groups") or "groups")


def _webhook(reader: _Reader, value: Any) -> WebhookConfig | None:
    key = "approvals.webhook"
    if value is None:
        return None
    section = reader.mapping(value, key, {"url", "max_attempts", "backoff_seconds", "timeout_seconds", "queue_size"})
    if "url" not in section:
        raise reader.fail(f"{key}.url", "is required")
    backoff = reader.typed(section, key, "backoff_seconds", float, 0.5)
    timeout = reader.typed(section, key, "timeout_seconds", float, 5.0)
    if not 0.01 <= backoff <= 60:
        raise reader.fail(f"{key}.backoff_seconds", "must be between 0.01 and 60")
    if not 0.1 <= timeout <= 60:
        raise reader.fail(f"{key}.timeout_seconds", "must be between 0.1 and 60")
    return WebhookConfig(url=_http_url(reader, section["url"], f"{key}.url"),
                         max_attempts=reader.positive(section, key, "max_attempts", 5),
                         backoff_seconds=backoff, timeout_seconds=timeout,
                         queue_size=reader.positive(section, key, "queue_size", 1000))


def parse_config(data: Any, source: Path) -> Config:
    """Validate a parsed YAML document; raise ConfigError naming file and key."""
    reader = _Reader(source)
    top = reader.mapping(
        data, "",
        {"listeners", "state_dir", "limits", "policy", "credentials", "identity", "audit", "routes",
         "approvals", "tasks", "metrics", "webhook", "store", "introspection", "approvers", "delegation",
         "tls_interception"},
    )
    listeners = reader.mapping(top.get("listeners"), "listeners", {"proxy", "admin", "metrics"})
    limits = reader.mapping(top.get("limits"), "limits", {"max_body_bytes", "max_in_flight", "header_timeout_seconds",
                                                          "body_timeout_seconds", "idle_timeout_seconds", "max_connections"})
    policy = reader.mapping(top.get("policy"), "policy", {"engine", "decision_path", "rego_dir", "timeout_ms", "rest", "embedded_workers",
                                                            "embedded_spare_engines", *_POLICY_LIFECYCLE_KEYS})
    rest = reader.mapping(policy.get("rest"), "policy.rest", {"url"})
    credentials = reader.mapping(
        top.get("credentials"), "credentials",
        {"issuer", "keys_dir", "algorithm", "max_ttl_seconds", "default_ttl_seconds", "reload_seconds"},
    )
    identity = reader.mapping(top.get("identity"), "identity", {"static", "token_file", "jwks", "audience", "issuer"})

    decision_path = reader.typed(policy, "policy", "decision_path", str, "sidecar/authz/decision")
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*$", decision_path):
        raise reader.fail("policy.decision_path", "must look like sidecar/authz/decision")
    rego_dir = reader.path(policy, "policy", "rego_dir", source.parent / "rego")
    assert rego_dir is not None
    engine = reader.choice(policy, "policy", "engine", ("embedded", "rest"), "embedded")
    lifecycle = _policy_lifecycle(reader, policy, engine)
    if engine == "embedded" and lifecycle["bundle"] is None and not rego_dir.is_dir():
        raise reader.fail("policy.rego_dir", f"no such directory: {rego_dir}")

    routes_value = top.get("routes")
    if not isinstance(routes_value, list) or not routes_value:
        raise reader.fail("routes", "must be a non-empty list")
    routes = [_route(reader, value, index) for index, value in enumerate(routes_value)]
    _check_unique_routes(reader, routes)

    identity_static = reader.typed(identity, "identity", "static", str, "")
    token_file = reader.path(identity, "identity", "token_file", None)
    if not identity_static and token_file is None:
        raise reader.fail("identity", "needs static or token_file")
    if token_file is not None and not reader.typed(identity, "identity", "jwks", str, ""):
        raise reader.fail("identity.jwks", "is required with token_file (a JWKS file or URL to verify the token)")
    if token_file is not None and not reader.typed(identity, "identity", "audience", str, ""):
        raise reader.fail("identity.audience", "is required with token_file (the audience the token is projected for)")

    return Config(
        source=source,
        proxy=_listen(reader, listeners, "proxy", Listen("127.0.0.1", 15001)),
        admin=_listen(reader, listeners, "admin", Listen("127.0.0.1", 15000)),
        metrics=_listen(reader, listeners, "metrics", Listen("127.0.0.1", 15090)),
        state_dir=reader.path(top, "", "state_dir", source.parent / ".state") or Path(".state"),
        max_body_bytes=reader.positive(limits, "limits", "max_body_bytes", 1024 * 1024),
        max_in_flight=reader.positive(limits, "limits", "max_in_flight", 4096),
        connections=_connection_limits(reader, limits),
        policy=PolicyConfig(
            engine=engine,
            decision_path=decision_path,
            rego_dir=rego_dir,
            timeout_ms=reader.positive(policy, "policy", "timeout_ms", 250),
            embedded_workers=_workers(reader, policy),
            embedded_spare_engines=_spare_engines(reader, policy),
            rest_url=_http_url(reader, rest.get("url", "http://127.0.0.1:8181"), "policy.rest.url"),
            **lifecycle,
        ),
        credentials=CredentialsConfig(
            issuer=reader.typed(credentials, "credentials", "issuer", str, "agent-sidecar"),
            keys_dir=reader.path(credentials, "credentials", "keys_dir", None),
            algorithm=reader.choice(credentials, "credentials", "algorithm", ("ES256", "EdDSA"), "ES256"),
            max_ttl_seconds=reader.positive(credentials, "credentials", "max_ttl_seconds", 300),
            default_ttl_seconds=reader.positive(credentials, "credentials", "default_ttl_seconds", 60),
            reload_seconds=_reload_seconds(reader, credentials),
        ),
        identity=IdentityConfig(
            static=identity_static or None,
            token_file=token_file,
            jwks=reader.typed(identity, "identity", "jwks", str, "") or None,
            audience=reader.typed(identity, "identity", "audience", str, "") or None,
            issuer=reader.typed(identity, "identity", "issuer", str, "") or None,
        ),
        store=_store(reader, top.get("store")),
        approvals=_approvals(reader, top.get("approvals")),
        introspection=_introspection(reader, top.get("introspection")),
        delegation=_delegation(reader, top.get("delegation")),
        tls_interception=_tls_interception(reader, top.get("tls_interception")),
        audit=_audit(reader, top.get("audit")),
        routes=tuple(routes),
        raw=top,
    )


def _tls_interception(reader: _Reader, value: Any) -> TlsInterceptionConfig:
    key = "tls_interception"
    section = reader.mapping(value, key, {"ca_cert", "ca_key", "leaf_cache_size", "handshake_timeout_seconds"})
    ca_cert = reader.path(section, key, "ca_cert", None)
    ca_key = reader.path(section, key, "ca_key", None)
    if (ca_cert is None) != (ca_key is None):
        raise reader.fail(f"{key}.{'ca_key' if ca_key is None else 'ca_cert'}", "is required with the other (both or neither)")
    for name, path in (("ca_cert", ca_cert), ("ca_key", ca_key)):
        if path is not None and not path.is_file():
            raise reader.fail(f"{key}.{name}", f"no such file: {path}")
    cache = reader.positive(section, key, "leaf_cache_size", 1024)
    if cache > 100_000:
        raise reader.fail(f"{key}.leaf_cache_size", "at most 100000")
    timeout = reader.typed(section, key, "handshake_timeout_seconds", float, 10.0)
    if not 0.1 <= timeout <= 120:
        raise reader.fail(f"{key}.handshake_timeout_seconds", "must be between 0.1 and 120")
    return TlsInterceptionConfig(ca_cert=ca_cert, ca_key=ca_key, leaf_cache_size=cache, handshake_timeout_seconds=timeout)


def _connection_limits(reader: _Reader, limits: dict[str, Any]) -> ConnectionLimits:
    seconds = {}
    for name, default in (("header_timeout_seconds", 10.0), ("body_timeout_seconds", 30.0), ("idle_timeout_seconds", 30.0)):
        value = reader.typed(limits, "limits", name, float, default)
        if not 0.1 <= value <= 3600:
            raise reader.fail(f"limits.{name}", "must be between 0.1 and 3600")
        seconds[name] = value
    return ConnectionLimits(max_connections=reader.positive(limits, "limits", "max_connections", 1024), **seconds)


_POLICY_LIFECYCLE_KEYS = ("reload_seconds", "bundle", "bundle_public_key", "bundle_key_id", "bundle_name", "shadow")


def _policy_lifecycle(reader: _Reader, policy: dict[str, Any], engine: str) -> dict[str, Any]:
    """The policy.* keys of issue 19 (docs/policy.md, "The policy's life")."""
    bundle = reader.typed(policy, "policy", "bundle", str, "") or None
    if bundle is not None and "://" in bundle and not bundle.startswith(("http://", "https://")):
        raise reader.fail("policy.bundle", "not an http(s) URL")
    if bundle is not None and not bundle.startswith(("http://", "https://")):
        bundle = str(reader.path(policy, "policy", "bundle", None))
        if engine == "embedded" and not Path(bundle).is_file():
            raise reader.fail("policy.bundle", f"no such file: {bundle}")
    elif bundle is not None:
        bundle = _http_url(reader, bundle, "policy.bundle")
    if bundle is not None and engine == "rest":
        raise reader.fail("policy.bundle", "is for the embedded engine; an OPA server loads its own bundle "
                                           "(opa run --server --bundle bundle.tar.gz)")
    public_key = reader.path(policy, "policy", "bundle_public_key", None)
    if public_key is not None and not public_key.is_file():
        raise reader.fail("policy.bundle_public_key", f"no such file: {public_key}")
    if public_key is not None and bundle is None:
        raise reader.fail("policy.bundle_public_key", "needs policy.bundle")
    default_reload = 30.0 if bundle is not None and bundle.startswith(("http://", "https://")) else 1.0
    reload_seconds = reader.typed(policy, "policy", "reload_seconds", float, default_reload)
    if reload_seconds != 0 and not 0.1 <= reload_seconds <= 3600:
        raise reader.fail("policy.reload_seconds", "must be 0 (no polling) or between 0.1 and 3600")
    name = reader.typed(policy, "policy", "bundle_name", str, "authz")
    if not re.match(r"^[A-Za-z0-9_.\-]{1,64}$", name):
        raise reader.fail("policy.bundle_name", "letters, digits, '_', '.', '-' (at most 64)")
    shadow = reader.typed(policy, "policy", "shadow", str, "") or None
    if shadow is not None:
        shadow = str(reader.path(policy, "policy", "shadow", None))
        if not Path(shadow).exists():
            raise reader.fail("policy.shadow", f"no such directory or bundle file: {shadow}")
    return {"reload_seconds": reload_seconds, "bundle": bundle, "bundle_public_key": public_key,
            "bundle_key_id": reader.typed(policy, "policy", "bundle_key_id", str, "") or None,
            "bundle_name": name, "shadow": shadow}


def _workers(reader: _Reader, policy: dict[str, Any]) -> int:
    workers = reader.positive(policy, "policy", "embedded_workers", PolicyConfig.embedded_workers)
    if workers > 64:
        raise reader.fail("policy.embedded_workers", "at most 64")
    return workers


def _spare_engines(reader: _Reader, policy: dict[str, Any]) -> int:
    spares = reader.typed(policy, "policy", "embedded_spare_engines", int, PolicyConfig.embedded_spare_engines)
    if not 0 <= spares <= 16:
        raise reader.fail("policy.embedded_spare_engines", "between 0 and 16")
    return spares


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
