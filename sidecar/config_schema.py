"""The one definition of the config file: pydantic models that validate it and produce its JSON Schema.

``parse`` validates a parsed YAML document against ``SidecarFile`` and turns it into the runtime
dataclasses of sidecar/config.py; ``json_schema`` is what ``agent-sidecar config schema`` prints and
docs/config.schema.json holds. Every check lives here, next to the key it is about, so an error
names its key path (``routes[2].upstream: not an http(s) URL``) and the schema cannot drift from
what the loader accepts. Imported only when a config is loaded (pydantic costs ~100 ms to import
and build), never by the modules that only use the dataclasses.
"""

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Callable, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import PydanticCustomError, core_schema

from .approvals.preview import DEFAULT_HIGHLIGHT_FIELDS, DEFAULT_MASK_FIELDS, DEFAULT_PREVIEW_BYTES, MAX_PREVIEW_BYTES
from .config import (CONTENT_CODINGS, CONVENTIONAL_CREDENTIAL_HEADERS, DEFAULT_METHODS, MCP_HINTS, ApprovalsConfig,
                     ApproversConfig, AuditConfig, AuditShipConfig, Config, ConfigError, ConnectionLimits,
                     CredentialsConfig, DelegationConfig, IdentityConfig, IntrospectionConfig, Listen, McpOptions,
                     PolicyConfig, Route, RouteCredential, RouteMatch, StoreConfig, TlsInterceptionConfig,
                     WebhookConfig)
from .secret import Secret
from .tasks.measures import (MAX_MEASURES_PER_ROUTE, MAX_PATHS_PER_MEASURE, MEASURE_NAME, Measure, MeasurePathError,
                              parse_path)

# ---------------------------------------------------------------- checks with their own words and schema


def _fail(message: str, *at: str | int) -> PydanticCustomError:
    """An error phrased for the operator; ``at`` is a key path below the value being checked."""
    return PydanticCustomError("config", message, {"at": at})


class Rule:
    """A check run after the type check: ``check(value, base_dir)`` returns the value (possibly normalised)
    or raises ``_fail``; ``schema`` is what it adds to the JSON Schema."""

    def __init__(self, check: Callable[[Any, Path], Any], **schema: Any) -> None:
        self.check = check
        self.schema = schema

    def _run(self, value: Any, info: ValidationInfo) -> Any:
        base = (info.context or {}).get("base", Path("."))
        return self.check(value, base)

    def __get_pydantic_core_schema__(self, source: Any, handler: Callable[[Any], core_schema.CoreSchema]) -> Any:
        return core_schema.with_info_after_validator_function(self._run, handler(source))

    def __get_pydantic_json_schema__(self, schema: Any, handler: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        generated = handler(schema)
        generated.update(self.schema)
        return generated


class Says:
    """Any error inside this value (its type, an item's type) becomes this one message at this key."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __get_pydantic_core_schema__(self, source: Any, handler: Callable[[Any], core_schema.CoreSchema]) -> Any:
        def wrap(value: Any, inner: Callable[[Any], Any]) -> Any:
            try:
                return inner(value)
            except ValidationError:
                raise _fail(self.message) from None

        return core_schema.no_info_wrap_validator_function(wrap, handler(source))


def between(low: float | None, high: float | None, message: str) -> Rule:
    def check(value: Any, _: Path) -> Any:
        if (low is not None and value < low) or (high is not None and value > high):
            raise _fail(message)
        return value

    schema = {k: v for k, v in (("minimum", low), ("maximum", high)) if v is not None}
    return Rule(check, **schema)


def zero_or_between(low: float, high: float | None, message: str) -> Rule:
    def check(value: Any, _: Path) -> Any:
        if value != 0 and (value < low or (high is not None and value > high)):
            raise _fail(message)
        return value

    ranged = {"minimum": low, **({"maximum": high} if high is not None else {})}
    return Rule(check, anyOf=[{"const": 0}, ranged])


def matches(pattern: str, message: str) -> Rule:
    compiled = re.compile(pattern)

    def check(value: str, _: Path) -> str:
        if not compiled.fullmatch(value):
            raise _fail(message)
        return value

    return Rule(check, pattern=f"^(?:{pattern})$")


def _resolve(value: str, base: Path) -> Path:
    candidate = Path(value)
    return candidate if candidate.is_absolute() else Path(os.path.normpath(base / candidate))


def _path(value: str, base: Path) -> str:
    return str(_resolve(value, base)) if value else value


def _existing_file(value: str, base: Path) -> str:
    path = _resolve(value, base)
    if not path.is_file():
        raise _fail(f"no such file: {path}")
    return str(path)


def _http_url(value: str, _: Path) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _fail("not an http(s) URL")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise _fail("must not carry a query, fragment or user info")
    return value.rstrip("/")


def _jwks_source(value: str, base: Path) -> str:
    """A JWKS: an http(s) URL, or a file (made absolute) that must exist."""
    if value.startswith(("http://", "https://")):
        return _http_url(value, base)
    path = Path(value) if Path(value).is_absolute() else base / value
    if not path.is_file():
        raise _fail(f"no such file: {path}")
    return str(path)


def _listen(value: str, _: Path) -> str:
    found = re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]*):(\d{1,5})", value)
    if not found:
        raise _fail("must be HOST:PORT")
    if int(found[2]) > 65535:
        raise _fail("port out of range")
    return value


def _prefix(value: str, _: Path) -> str:
    if not value.startswith("/") or "//" in value:
        raise _fail("must be a path starting with /")
    return value.rstrip("/") or "/"


def _route_prefix(value: str, base: Path) -> str:
    prefix = _prefix(value, base)
    if prefix == "/":
        raise _fail("must not be / (it would shadow every route)")
    return prefix


def _measure_path(value: str, _: Path) -> str:
    try:
        parse_path(value)
    except MeasurePathError as exc:
        raise _fail(str(exc)) from None
    return value


def _nonempty(message: str) -> Rule:
    def check(value: list[str], _: Path) -> list[str]:
        if not all(value):
            raise _fail(message)
        return value

    return Rule(check)


def _length(low: int, high: int, message: str) -> Rule:
    def check(value: Any, _: Path) -> Any:
        if not low <= len(value) <= high:
            raise _fail(message)
        return value

    return Rule(check, minItems=low, maxItems=high) if high < 10**9 else Rule(check, minItems=low)


def _methods(value: list[str], _: Path) -> list[str]:
    if "CONNECT" in value or "TRACE" in value:
        raise _fail("CONNECT and TRACE cannot be listed (CONNECT is allow_tunnel)")
    return value


def _pass_headers(value: list[str], _: Path) -> list[str]:
    for name in value:
        if name.lower() not in CONVENTIONAL_CREDENTIAL_HEADERS:
            raise _fail(f"{name} is not one of the conventional credential headers")
    return value


def _measure_count(value: dict[str, Any], _: Path) -> dict[str, Any]:
    if len(value) > MAX_MEASURES_PER_ROUTE:
        raise _fail(f"at most {MAX_MEASURES_PER_ROUTE} measures per route")
    return value


def _redis_url(value: str, _: Path) -> str:
    if urlsplit(value).scheme not in ("redis", "rediss", "unix"):
        raise _fail("must be a redis://, rediss:// or unix:// URL")
    return value


def _ship_resource(value: str, _: Path) -> str:
    if not value.startswith("/") or "?" in value or "#" in value:
        raise _fail("must be a path starting with /")
    return value


_HEADER_PATTERN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"

Positive = Annotated[int, between(1, None, "must be a positive integer")]
PositiveNumber = Annotated[float, Rule(lambda v, _: v if v > 0 else _raise("must be a positive number"),
                                       exclusiveMinimum=0)]
HttpUrl = Annotated[str, Rule(_http_url, format="uri", pattern="^https?://")]
FilePath = Annotated[str, Rule(_path)]
ExistingFile = Annotated[str, Rule(_existing_file)]
JwksSource = Annotated[str, Rule(_jwks_source)]
ListenAddress = Annotated[str, Rule(_listen, pattern=r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]*):\d{1,5}$",
                                    examples=["127.0.0.1:15001"])]
HeaderName = Annotated[str, matches(_HEADER_PATTERN, "not a valid header name")]
NonEmptyStrings = Annotated[list[str], Says("must be a list of non-empty strings"),
                            _nonempty("must be a list of non-empty strings")]


def _raise(message: str) -> Any:
    raise _fail(message)


_REQUIRED = Rule(lambda v, _: v or _raise("is required"), minLength=1)


def _field(description: str, default: Any = ..., **extra: Any) -> Any:
    return Field(default, description=description, **extra)


def _section(description: str) -> Any:
    """A section left out is an empty one, validated like any other (its checks still run)."""
    return Field(default_factory=dict, description=description, validate_default=True)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, hide_input_in_errors=True, defer_build=True)


# ---------------------------------------------------------------- the file, section by section


class Listeners(Section):
    """Where the sidecar listens, each HOST:PORT."""

    proxy: ListenAddress = _field("The agent's only way out: route-prefix, forward-proxy and CONNECT modes.",
                                  "127.0.0.1:15001")
    admin: ListenAddress = _field("JWKS, tasks, approvals, introspection, the approver page.", "127.0.0.1:15000")
    metrics: ListenAddress = _field("/metrics, /healthz, /readyz.", "127.0.0.1:15090")


class Limits(Section):
    """Bounds on what one call or one client can hold."""

    max_body_bytes: Positive = _field("Bodies past this are refused with 413, never forwarded unchecked.", 1024 * 1024)
    max_in_flight: Positive = _field("Calls past this are refused at once with 503 overloaded.", 4096)
    max_body_bytes_in_flight: Positive = _field(
        "The bodies of every call in flight together (a parsed JSON body can take ~25 times its bytes): a call "
        "whose body would go past this is refused with 503 overloaded.", 16 * 1024 * 1024)
    header_timeout_seconds: Annotated[float, between(0.1, 3600, "must be between 0.1 and 3600")] = _field(
        "A request head must arrive this soon after its first byte (408 otherwise).", 10.0)
    body_timeout_seconds: Annotated[float, between(0.1, 3600, "must be between 0.1 and 3600")] = _field(
        "And its body this soon after the head.", 30.0)
    idle_timeout_seconds: Annotated[float, between(0.1, 3600, "must be between 0.1 and 3600")] = _field(
        "An idle kept-alive connection is closed after this.", 30.0)
    max_connections: Positive = _field("One more connection is answered 503 and closed.", 1024)

    @model_validator(mode="after")
    def _one_body_fits(self) -> "Limits":
        if self.max_body_bytes_in_flight < self.max_body_bytes:
            raise _fail("must be at least max_body_bytes (a body of the largest size could never be read)",
                        "max_body_bytes_in_flight")
        return self


class PolicyRest(Section):
    url: HttpUrl = _field("The OPA server's base URL (its REST Data API).", "http://127.0.0.1:8181")


class Policy(Section):
    """The OPA engine, the policy it evaluates and how it follows its source (docs/policy.md)."""

    engine: Literal["embedded", "rest"] = _field(
        "embedded: OPA in process; rest: an `opa run --server` beside the sidecar.", "embedded")
    decision_path: Annotated[str, matches(r"[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*",
                                          "must look like sidecar/authz/decision")] = _field(
        "The rule queried for each decision.", "sidecar/authz/decision")
    rego_dir: FilePath = _field("The Rego tree the embedded engine loads (default: rego/ beside this file).", "")
    timeout_ms: Positive = _field("Past this the call is refused 503 policy_unavailable.", 250)
    rest: PolicyRest = _section("The OPA server, for engine: rest.")
    embedded_workers: Annotated[int, between(1, None, "must be a positive integer"),
                                between(None, 64, "at most 64")] = _field(
        "Threads evaluating on the embedded engine in parallel (one compiled policy).", 1)
    embedded_spare_engines: Annotated[int, between(0, 16, "between 0 and 16")] = _field(
        "Standby evaluation threads that take over from an evaluation past its deadline.", 1)
    reload_seconds: Annotated[float, zero_or_between(0.1, 3600, "must be 0 (no polling) or between 0.1 and 3600")] \
        | None = _field("How often the policy source is polled; 0: only on SIGHUP or POST /v1/policy/reload "
                        "(default: 30 for a bundle URL, 1 otherwise).", None)
    bundle: str | None = _field("An OPA bundle (.tar.gz) file or http(s) URL, loaded instead of rego_dir.", None)
    bundle_public_key: ExistingFile | None = _field("PEM; when set, only bundles signed with its key load.", None)
    bundle_key_id: str | None = _field("When set, the bundle signature's kid must name it.", None)
    bundle_name: Annotated[str, matches(r"[A-Za-z0-9_.\-]{1,64}", "letters, digits, '_', '.', '-' (at most 64)")] = \
        _field("The name decisions give their policy (OPA's decision-log bundles).", "authz")
    shadow: str | None = _field("A candidate policy (directory or bundle) evaluated beside the live one, never "
                                "enforced.", None)

    @model_validator(mode="after")
    def _sources(self, info: ValidationInfo) -> "Policy":
        base: Path = (info.context or {}).get("base", Path("."))
        bundle = self.bundle or None
        if bundle is not None and "://" in bundle and not bundle.startswith(("http://", "https://")):
            raise _fail("not an http(s) URL", "bundle")
        if bundle is not None and not bundle.startswith(("http://", "https://")):
            bundle = str(_resolve(bundle, base))
            if self.engine == "embedded" and not Path(bundle).is_file():
                raise _fail(f"no such file: {bundle}", "bundle")
        elif bundle is not None:
            try:
                bundle = _http_url(bundle, base)
            except PydanticCustomError as exc:
                raise _fail(exc.message(), "bundle") from None
        if bundle is not None and self.engine == "rest":
            raise _fail("is for the embedded engine; an OPA server loads its own bundle "
                        "(opa run --server --bundle bundle.tar.gz)", "bundle")
        if self.bundle_public_key is not None and bundle is None:
            raise _fail("needs policy.bundle", "bundle_public_key")
        rego_dir = self.rego_dir or str(base / "rego")
        if self.engine == "embedded" and bundle is None and not Path(rego_dir).is_dir():
            raise _fail(f"no such directory: {rego_dir}", "rego_dir")
        shadow = str(_resolve(self.shadow, base)) if self.shadow else None
        if shadow is not None and not Path(shadow).exists():
            raise _fail(f"no such directory or bundle file: {shadow}", "shadow")
        return self.model_copy(update={"bundle": bundle, "rego_dir": rego_dir, "shadow": shadow})


class Credentials(Section):
    """The per-call JWTs the sidecar mints (docs/credentials.md)."""

    issuer: str = _field("The iss claim.", "agent-sidecar")
    keys_dir: FilePath | None = _field("PEM private keys, rotated without restart; unset: a development key in "
                                       "state_dir.", None)
    algorithm: Literal["ES256", "EdDSA"] = _field("The signing algorithm.", "ES256")
    max_ttl_seconds: Positive = _field("No credential lives longer, whatever the policy asks.", 300)
    default_ttl_seconds: Positive = _field("When the policy's decision names no TTL.", 60)
    reload_seconds: Annotated[float, between(0.05, 60, "must be between 0.05 and 60")] = _field(
        "How often keys_dir is checked for new keys.", 1.0)


class Identity(Section):
    """The agent's workload identity: a fixed one for local runs, a projected token in a pod."""

    static: str | None = _field("A fixed identity such as spiffe://cluster.local/ns/agents/sa/my-agent.", None)
    token_file: FilePath | None = _field("A projected service-account token, re-read when it changes.", None)
    jwks: str | None = _field("JWKS file or URL that verifies token_file (required with it).", None)
    audience: str | None = _field("The audience token_file is projected for (required with it).", None)
    issuer: str | None = _field("When set, the token's iss must match.", None)

    @model_validator(mode="after")
    def _one_source(self) -> "Identity":
        if not self.static and not self.token_file:
            raise _fail("needs static or token_file")
        if self.token_file and not self.jwks:
            raise _fail("is required with token_file (a JWKS file or URL to verify the token)", "jwks")
        if self.token_file and not self.audience:
            raise _fail("is required with token_file (the audience the token is projected for)", "audience")
        return self


class AuditShip(Section):
    """Audit events shipped to an HTTP sink in OPA's decision-log upload format."""

    url: HttpUrl = _field("The sink's base URL.")
    resource: Annotated[str, Rule(_ship_resource, pattern="^/[^?#]*$")] = _field("The path posted to.", "/logs")
    interval_seconds: PositiveNumber = _field("How often a batch is sent.", 5.0)
    queue_size: Positive = _field("Events waiting to be shipped; past it the oldest are counted and dropped.", 10_000)
    queue_bytes: Positive = _field(
        "Bytes held by the events waiting to be shipped (their policy input, request bodies included, and their "
        "other values' JSON); past it the oldest are counted and dropped.", 64 * 1024 * 1024)
    max_batch: Positive = _field("Events per upload.", 1_000)
    backoff_min_seconds: PositiveNumber = _field("First retry delay.", 0.5)
    backoff_max_seconds: PositiveNumber = _field("Longest retry delay.", 60.0)
    timeout_seconds: PositiveNumber = _field("Per upload.", 10.0)
    bearer_token_file: ExistingFile | None = _field("A bearer token for the sink, re-read when it changes.", None)

    @model_validator(mode="after")
    def _backoff(self) -> "AuditShip":
        if self.backoff_max_seconds < self.backoff_min_seconds:
            raise _fail("must not be less than backoff_min_seconds", "backoff_max_seconds")
        return self


class Audit(Section):
    """The hash-chained audit log."""

    path: FilePath | None = _field("Default: <state_dir>/audit.jsonl.", None)
    fail_closed: bool = _field("Refuse calls when the audit log cannot be written.", True)
    rotate_bytes: Annotated[int, zero_or_between(4096, None, "must be 0 (never rotate) or at least 4096")] = _field(
        "Rotate the file past this size, keeping the chain; 0: never.", 64 * 1024 * 1024)
    queue_size: Positive = _field("Events waiting to be written.", 10_000)
    queue_bytes: Positive = _field(
        "Bytes held by the events waiting to be written (their policy input, request bodies included, and their "
        "other values' JSON); past it an event is refused and counted, unless the waiting events hold none (one "
        "larger event is still written).", 64 * 1024 * 1024)
    ship: AuditShip | None = _field("Ship events to an HTTP sink too.", None)


class Store(Section):
    """Tasks, the revocation list and approvals: sqlite (one pod) or redis (replicas share them)."""

    backend: Literal["sqlite", "redis"] = _field("sqlite for one pod; redis when replicas share state.", "sqlite")
    sqlite_path: FilePath | None = _field("Default: <state_dir>/sidecar.db.", None)
    redis_url: Annotated[str, Rule(_redis_url, pattern="^(redis|rediss|unix)://")] | None = _field(
        "redis://, rediss:// or unix:// URL; required with backend: redis.", None)

    @model_validator(mode="after")
    def _redis(self) -> "Store":
        if self.backend == "redis" and not self.redis_url:
            raise _fail("is required when backend is redis", "redis_url")
        return self


class Approvers(Section):
    """Who may approve: OIDC JWTs verified against this JWKS."""

    jwks: Annotated[str, _REQUIRED, Rule(_jwks_source)] = _field("Your identity provider's JWKS: an http(s) URL or a file.")
    issuer: Annotated[str, _REQUIRED] = _field("The approver tokens' iss.")
    audience: Annotated[str, _REQUIRED] = _field("The approver tokens' aud.")
    group_claim: str = _field("The claim listing the approver's groups (the policy names the group).", "groups")


class Webhook(Section):
    """Each held call posted to a URL (chat, ticketing), retried with backoff."""

    url: HttpUrl = _field("Where held calls are posted.")
    max_attempts: Positive = _field("Attempts per held call.", 5)
    backoff_seconds: Annotated[float, between(0.01, 60, "must be between 0.01 and 60")] = _field(
        "First retry delay, doubled each attempt.", 0.5)
    timeout_seconds: Annotated[float, between(0.1, 60, "must be between 0.1 and 60")] = _field("Per attempt.", 5.0)
    queue_size: Positive = _field("Posts waiting; past it they are counted and dropped.", 1000)


class Approvals(Section):
    """Held calls and the humans who decide them (docs/approvals.md)."""

    max_wait_seconds: Annotated[int, between(0, 3600, "must be between 0 and 3600")] = _field(
        "The cap on an agent's Prefer: wait=N.", 60)
    default_expiry_seconds: Annotated[int, between(1, None, "must be a positive integer"),
                                      between(None, 604800, "must be at most 604800 (a week)")] = _field(
        "When the policy's decision names none.", 900)
    max_pending_per_task: Annotated[int, between(1, 1000, "must be between 1 and 1000")] = _field(
        "Approvals of one task waiting for a human at once (the calls made outside any task count as one task of "
        "their agent); a held call that would ask for one more is refused with 429 too_many_pending_approvals, "
        "never forwarded, and nobody is asked. A retry of a call whose approval is pending still gets it.", 8)
    max_pending_per_agent: Annotated[int, between(1, 100_000, "must be between 1 and 100000")] = _field(
        "Approvals of one agent waiting for a human at once, over all its tasks (an agent can open tasks at will); "
        "past it, refused the same way. At least max_pending_per_task.", 32)
    page_url: HttpUrl | None = _field("The approver page as approvers reach it; default: http://<admin>/ui/.", None)
    approvers: Approvers | None = _field("Without it nobody can approve through the API.", None)
    webhook: Webhook | None = _field("Notify a URL of each held call.", None)
    body_preview_bytes: Annotated[int, between(0, MAX_PREVIEW_BYTES,
                                               f"must be between 0 (size and hash only) and {MAX_PREVIEW_BYTES}")] = \
        _field("A JSON or form body is shown pretty-printed up to this many bytes; 0: size and hash only.",
               DEFAULT_PREVIEW_BYTES)
    mask_fields: NonEmptyStrings = _field("Body fields and query parameters masked wherever they are, added to the built-in list: "
                                          + ", ".join(DEFAULT_MASK_FIELDS) + ".", [])
    highlight_fields: NonEmptyStrings | None = _field(
        "Body fields set apart above the body; replaces the built-in list: " + ", ".join(DEFAULT_HIGHLIGHT_FIELDS) + ".",
        None)

    @model_validator(mode="after")
    def _agent_holds_a_task(self) -> "Approvals":
        if self.max_pending_per_agent < self.max_pending_per_task:
            raise _fail("must be at least max_pending_per_task (an agent could never fill one task)",
                        "max_pending_per_agent")
        return self


def _token_lengths(value: list[str], _: Path) -> list[str]:
    if any(len(t) < 16 for t in value):
        raise _fail("each token needs at least 16 characters")
    return value


class Introspection(Section):
    """Bearer tokens tools present to POST /introspect (RFC 7662)."""

    tokens: Annotated[list[str], Says("must be a list of non-empty strings"),
                      _nonempty("must be a list of non-empty strings"), Rule(_token_lengths)] = _field(
        "Tokens inline (at least 16 characters each); prefer tokens_file.", [])
    tokens_file: ExistingFile | None = _field("One bearer token per line, re-read when it changes.", None)


class Delegation(Section):
    """Calls made on behalf of a parent agent (X-Agent-Delegation)."""

    jwks: str | None = _field("File or URL of the parent sidecars' keys; unset: X-Agent-Delegation is refused.", None)
    issuers: NonEmptyStrings = _field("The issuers of the parent sidecars (required with jwks).", [])
    audiences: NonEmptyStrings = _field("The audiences this agent is called as (required with jwks).", [])
    max_depth: Positive = _field("The longest delegation chain accepted.", 8)

    @model_validator(mode="after")
    def _with_jwks(self, info: ValidationInfo) -> "Delegation":
        if not self.jwks:
            return self
        if not self.issuers:
            raise _fail("is required with jwks (the issuers of the parent sidecars)", "issuers")
        if not self.audiences:
            raise _fail("is required with jwks (the audiences this agent is called as)", "audiences")
        if self.jwks.startswith(("http://", "https://")):
            return self
        try:
            jwks = _jwks_source(self.jwks, (info.context or {}).get("base", Path(".")))
        except PydanticCustomError as exc:
            raise _fail(exc.message(), "jwks") from None
        return self.model_copy(update={"jwks": jwks})


class TlsInterception(Section):
    """The pod-local CA for routes with intercept_tls. No files: a development CA in state_dir."""

    ca_cert: FilePath | None = _field("The CA certificate the agent trusts (PEM).", None)
    ca_key: FilePath | None = _field("Its private key, readable by the sidecar's user only (0600).", None)
    leaf_cache_size: Annotated[int, between(1, None, "must be a positive integer"),
                               between(None, 100_000, "at most 100000")] = _field(
        "Leaf certificates kept in memory (never written to disk).", 1024)
    handshake_timeout_seconds: Annotated[float, between(0.1, 120, "must be between 0.1 and 120")] = _field(
        "The agent's TLS handshake must finish this soon.", 10.0)

    @model_validator(mode="after")
    def _pair(self) -> "TlsInterception":
        if (self.ca_cert is None) != (self.ca_key is None):
            raise _fail("is required with the other (both or neither)", "ca_key" if self.ca_key is None else "ca_cert")
        for name, path in (("ca_cert", self.ca_cert), ("ca_key", self.ca_key)):
            if path is not None and not Path(path).is_file():
                raise _fail(f"no such file: {path}", name)
        return self


class Match(Section):
    """Which requests a route takes: by path prefix (route-prefix mode), by host (forward proxy, CONNECT)."""

    path_prefix: Annotated[str, Rule(_route_prefix, pattern="^/")] | None = _field(
        "http://<proxy>/<prefix>/... is forwarded to upstream + the rest of the path.", None)
    host: Annotated[str, matches(r"[A-Za-z0-9.\-]+(:\d+)?", "must be a host name, optionally with :port")] | None = \
        _field("The host an agent names through HTTP_PROXY/HTTPS_PROXY or reaches transparently.", None)
    host_path_prefix: Annotated[str, Rule(_prefix, pattern="^/")] | None = _field(
        "With host: only paths under this prefix.", None)

    @model_validator(mode="after")
    def _something(self) -> "Match":
        if self.path_prefix is None and self.host is None:
            raise _fail("needs path_prefix or host")
        return self


class RouteCredentialFile(Section):
    """What the sidecar injects upstream in place of anything the agent sent."""

    mode: Literal["jwt", "static", "none"] = _field("jwt: a fresh JWT per call; static: a key from a file; none.",
                                                     "jwt")
    header: HeaderName = _field("The header the credential is injected as.", "Authorization")
    scheme: str | None = _field("Its scheme (default: Bearer for Authorization, none otherwise).", None)
    static_key_file: FilePath | None = _field("The key for mode: static, read by the sidecar only.", None)
    strip_headers: Annotated[list[HeaderName], Says("must be a list of header names")] = _field(
        "Removed too, beyond the credential headers stripped on every route.", [])
    pass_headers: Annotated[list[str], Says("must be a list of header names"), Rule(_pass_headers)] = _field(
        "Conventional credential headers (" + ", ".join(CONVENTIONAL_CREDENTIAL_HEADERS) + ") this route forwards.",
        [])

    @model_validator(mode="after")
    def _consistent(self) -> "RouteCredentialFile":
        stripped = {h.lower() for h in self.strip_headers}
        for name in self.pass_headers:
            if name.lower() == self.header.lower() or name.lower() in stripped:
                raise _fail(f"{name} is also the route's credential header or in strip_headers", "pass_headers")
        if self.mode == "static" and not self.static_key_file:
            raise _fail("is required when mode is static", "static_key_file")
        return self


class RouteTls(Section):
    """TLS from the sidecar to an https upstream."""

    verify: bool = _field("Verify the upstream's certificate.", True)
    ca_bundle: ExistingFile | None = _field("CA certificates (PEM) to verify it with instead of the system's.", None)


class ToolHints(Section):
    readOnlyHint: bool | None = None
    destructiveHint: bool | None = None
    idempotentHint: bool | None = None
    openWorldHint: bool | None = None


class Mcp(Section):
    """How an MCP route answers refusals and which tool hints it believes (docs/mcp.md)."""

    refusal: Literal["tool_result", "jsonrpc_error"] = _field(
        "How a refused tools/call is answered: an error result the model reads, or a JSON-RPC error.", "tool_result")
    tools: dict[str, ToolHints] = _field("Hints the operator pins by tool name, whatever the server says.", {})
    trust_server_annotations: bool = _field("false: a server's hints may only make a call stricter.", False)


MeasurePaths = Annotated[list[Annotated[str, Rule(_measure_path)]],
                         _length(1, MAX_PATHS_PER_MEASURE, f"must be a list of 1 to {MAX_PATHS_PER_MEASURE} JSON paths")]
MeasureName = Annotated[str, matches(MEASURE_NAME.pattern.strip("^$"),
                                     "a measure name is lower-case letters, digits and _ (at most 32)")]


class RouteFile(Section):
    """One tool the agent may reach."""

    name: Annotated[str, matches(r"[a-z0-9][a-z0-9_\-]{0,62}", "must be lower-case letters, digits, - or _")] = \
        _field("The tool's name in the policy input, metrics and audit.")
    match: Match = _field("Which requests this route takes.")
    upstream: HttpUrl = _field("Where allowed calls are forwarded.")
    labels: Annotated[dict[str, Any], Says("must be a mapping of names to values")] = _field(
        "Facts the policy reads, such as environment, data_classification, reversible.", {})
    credential: RouteCredentialFile = _section("The credential injected upstream.")
    allow_tunnel: bool = _field("CONNECT to this host is a blind tunnel if true (intercept_tls wins), refused if not.",
                                False)
    intercept_tls: bool = _field("CONNECT and redirected TLS to match.host are decrypted with a leaf from the pod CA "
                                 "and each request decided.", False)
    tls: RouteTls = _section("TLS to the upstream.")
    timeout_seconds: float = _field("The upstream's answer must arrive this soon.", 30.0)
    measures: Annotated[dict[MeasureName, MeasurePaths], Rule(_measure_count, maxProperties=MAX_MEASURES_PER_ROUTE)] \
        = _field("Task totals measured from the body: {name: [JSON path, ...]} (sidecar/tasks/measures.py).", {})
    methods: Annotated[list[Annotated[str, matches(r"[A-Z]{1,20}", "must be an upper-case method name such as GET")]],
                       _length(1, 10**9, "must be a non-empty list"), Rule(_methods)] | None = _field(
        "Methods accepted; others are refused 405 (default: " + " ".join(DEFAULT_METHODS) + ").", None)
    protocol: Literal["http", "mcp"] | None = _field(
        "mcp: JSON-RPC is parsed on this route (never sniffed from a body); default http.", None)
    content_encodings: list[Literal["gzip", "deflate"]] = _field(
        "Request codings decoded once and judged; any other Content-Encoding is refused 415.", [])
    mcp: Mcp | None = _field("For protocol: mcp.", None)

    @model_validator(mode="after")
    def _consistent(self) -> "RouteFile":
        label = self.labels.get("protocol")
        if label is not None and str(label).lower() == "mcp" and self.protocol == "http":
            raise _fail("is http but labels.protocol says mcp", "protocol")
        is_mcp = self.protocol == "mcp" or (label is not None and str(label).lower() == "mcp")
        if self.mcp is not None and not is_mcp:
            raise _fail("is only for routes with protocol: mcp", "mcp")
        if self.intercept_tls and self.match.host is None:
            raise _fail("needs match.host (the host whose TLS is intercepted)", "intercept_tls")
        if self.intercept_tls and not self.tls.verify:
            raise _fail("cannot be false with intercept_tls: the agent's TLS is ended at the sidecar, so the "
                        "sidecar's own TLS to the upstream must be verified", "tls", "verify")
        return self


class SidecarFile(Section):
    """agent-sidecar configuration: one YAML file, validated at start-up. Relative paths are relative to the file."""

    model_config = ConfigDict(title="agent-sidecar configuration")

    listeners: Listeners = _section("Where the sidecar listens.")
    state_dir: FilePath = _field("Audit log, development keys, embedded stores (default: .state beside this file).",
                                 "")
    limits: Limits = _section("Bounds on bodies, connections and calls in flight.")
    policy: Policy = _section("The OPA engine and the policy it evaluates.")
    credentials: Credentials = _section("The per-call credentials the sidecar mints.")
    identity: Identity = _section("The agent's workload identity.")
    audit: Audit = _section("The hash-chained audit log.")
    store: Store = _section("Where tasks, revocations and approvals are kept.")
    approvals: Approvals = _section("Held calls and who may approve them.")
    introspection: Introspection = _section("Who may ask POST /introspect whether a credential is still good.")
    delegation: Delegation = _section("Calls on behalf of a parent agent.")
    tls_interception: TlsInterception = _section("The pod-local CA for routes with intercept_tls.")
    routes: Annotated[list[RouteFile], _length(1, 10**9, "must be a non-empty list")] = _field(
        "The tools the agent may reach; anything else is denied.")

    @model_validator(mode="after")
    def _unique_routes(self) -> "SidecarFile":
        names: dict[str, int] = {}
        prefixes: dict[str, int] = {}
        hosts: dict[tuple[str, str | None], int] = {}
        for index, route in enumerate(self.routes):
            if route.name in names:
                raise _fail(f"duplicates routes[{names[route.name]}]", "routes", index, "name")
            names[route.name] = index
            if route.match.path_prefix:
                if route.match.path_prefix in prefixes:
                    raise _fail(f"duplicates routes[{prefixes[route.match.path_prefix]}]",
                                "routes", index, "match", "path_prefix")
                prefixes[route.match.path_prefix] = index
            if route.match.host:
                key = (route.match.host.lower(), route.match.host_path_prefix)
                if key in hosts:
                    raise _fail(f"duplicates routes[{hosts[key]}]", "routes", index, "match", "host")
                hosts[key] = index
        return self


# ---------------------------------------------------------------- errors, schema, conversion


_TYPE_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "is required",
    "int_type": "must be an integer", "int_parsing": "must be an integer", "int_from_float": "must be an integer",
    "float_type": "must be a number", "float_parsing": "must be a number",
    "string_type": "must be a string",
    "bool_type": "must be true or false", "bool_parsing": "must be true or false",
    "list_type": "must be a list",
    "dict_type": "must be a mapping", "model_type": "must be a mapping", "model_attributes_type": "must be a mapping",
}


def _key_path(loc: tuple[str | int, ...]) -> str:
    text = ""
    for part in loc:
        if part == "[key]":
            continue
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(root)"


def _message(error: Any) -> str:
    kind = error["type"]
    if kind == "config":
        return str(error["msg"])
    if kind == "literal_error":
        expected = str(error.get("ctx", {}).get("expected", ""))
        return "must be one of " + ", ".join(part.strip("'") for part in re.split(r", | or ", expected))
    return _TYPE_MESSAGES.get(kind, str(error["msg"]))


def _errors(exc: ValidationError, source: Path) -> ConfigError:
    lines = []
    for error in exc.errors(include_url=False):
        at = tuple(error.get("ctx", {}).get("at", ())) if error["type"] == "config" else ()
        lines.append(f"{source.name}: {_key_path(tuple(error['loc']) + at)}: {_message(error)}")
    return ConfigError("\n".join(dict.fromkeys(lines)))


def _without_nulls(value: Any, depth: int = 0) -> Any:
    """An empty key (``keys_dir:``) is the same as leaving it out; labels are the policy's and kept as written."""
    if isinstance(value, dict):
        return {k: (v if k == "labels" else _without_nulls(v, depth + 1)) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v, depth + 1) for v in value]
    return value


class _Schema(GenerateJsonSchema):
    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


def json_schema() -> dict[str, Any]:
    """The config file's JSON Schema (draft 2020-12), as `agent-sidecar config schema` prints it."""
    schema = SidecarFile.model_json_schema(schema_generator=_Schema)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=False) + "\n"


def parse(data: Any, source: Path) -> Config:
    """Validate a parsed YAML document; raise ConfigError naming file and key path."""
    document = {} if data is None else data
    try:
        model = SidecarFile.model_validate(_without_nulls(document), context={"base": source.parent})
    except ValidationError as exc:
        raise _errors(exc, source) from None
    return _config(model, source, document)


def _address(value: str) -> Listen:
    host, _, port = value.rpartition(":")
    return Listen(host.strip("[]") or "0.0.0.0", int(port))


def _config(model: SidecarFile, source: Path, raw: dict[str, Any]) -> Config:
    policy, credentials, identity, audit, approvals = (model.policy, model.credentials, model.identity, model.audit,
                                                       model.approvals)
    bundle_url = policy.bundle is not None and policy.bundle.startswith(("http://", "https://"))
    limits = model.limits
    return Config(
        source=source,
        proxy=_address(model.listeners.proxy),
        admin=_address(model.listeners.admin),
        metrics=_address(model.listeners.metrics),
        state_dir=Path(model.state_dir) if model.state_dir else source.parent / ".state",
        max_body_bytes=limits.max_body_bytes,
        max_in_flight=limits.max_in_flight,
        max_body_bytes_in_flight=limits.max_body_bytes_in_flight,
        connections=ConnectionLimits(header_timeout_seconds=limits.header_timeout_seconds,
                                     body_timeout_seconds=limits.body_timeout_seconds,
                                     idle_timeout_seconds=limits.idle_timeout_seconds,
                                     max_connections=limits.max_connections),
        policy=PolicyConfig(
            engine=policy.engine, decision_path=policy.decision_path, rego_dir=Path(policy.rego_dir),
            timeout_ms=policy.timeout_ms, rest_url=policy.rest.url, embedded_workers=policy.embedded_workers,
            embedded_spare_engines=policy.embedded_spare_engines,
            reload_seconds=policy.reload_seconds if policy.reload_seconds is not None else (30.0 if bundle_url else 1.0),
            bundle=policy.bundle,
            bundle_public_key=Path(policy.bundle_public_key) if policy.bundle_public_key else None,
            bundle_key_id=policy.bundle_key_id or None, bundle_name=policy.bundle_name, shadow=policy.shadow),
        credentials=CredentialsConfig(
            issuer=credentials.issuer, keys_dir=Path(credentials.keys_dir) if credentials.keys_dir else None,
            algorithm=credentials.algorithm, max_ttl_seconds=credentials.max_ttl_seconds,
            default_ttl_seconds=credentials.default_ttl_seconds, reload_seconds=credentials.reload_seconds),
        identity=IdentityConfig(static=identity.static or None,
                                token_file=Path(identity.token_file) if identity.token_file else None,
                                jwks=identity.jwks or None, audience=identity.audience or None,
                                issuer=identity.issuer or None),
        audit=AuditConfig(
            path=Path(audit.path) if audit.path else None, fail_closed=audit.fail_closed,
            rotate_bytes=audit.rotate_bytes, queue_size=audit.queue_size, queue_bytes=audit.queue_bytes,
            ship=None if audit.ship is None else AuditShipConfig(
                url=audit.ship.url, resource=audit.ship.resource, interval_seconds=audit.ship.interval_seconds,
                queue_size=audit.ship.queue_size, queue_bytes=audit.ship.queue_bytes, max_batch=audit.ship.max_batch,
                backoff_min_seconds=audit.ship.backoff_min_seconds,
                backoff_max_seconds=audit.ship.backoff_max_seconds, timeout_seconds=audit.ship.timeout_seconds,
                bearer_token_file=Path(audit.ship.bearer_token_file) if audit.ship.bearer_token_file else None)),
        store=StoreConfig(backend=model.store.backend,
                          sqlite_path=Path(model.store.sqlite_path) if model.store.sqlite_path else None,
                          redis_url=model.store.redis_url or None),
        approvals=ApprovalsConfig(
            max_wait_seconds=approvals.max_wait_seconds, default_expiry_seconds=approvals.default_expiry_seconds,
            max_pending_per_task=approvals.max_pending_per_task, max_pending_per_agent=approvals.max_pending_per_agent,
            page_url=approvals.page_url + "/" if approvals.page_url else None,
            approvers=None if approvals.approvers is None else ApproversConfig(
                jwks=approvals.approvers.jwks, issuer=approvals.approvers.issuer,
                audience=approvals.approvers.audience, group_claim=approvals.approvers.group_claim or "groups"),
            webhook=None if approvals.webhook is None else WebhookConfig(
                url=approvals.webhook.url, max_attempts=approvals.webhook.max_attempts,
                backoff_seconds=approvals.webhook.backoff_seconds, timeout_seconds=approvals.webhook.timeout_seconds,
                queue_size=approvals.webhook.queue_size),
            body_preview_bytes=approvals.body_preview_bytes,
            mask_fields=DEFAULT_MASK_FIELDS + tuple(m for m in approvals.mask_fields if m not in DEFAULT_MASK_FIELDS),
            highlight_fields=DEFAULT_HIGHLIGHT_FIELDS if approvals.highlight_fields is None
            else tuple(approvals.highlight_fields)),
        introspection=IntrospectionConfig(
            tokens=tuple(Secret(t) for t in model.introspection.tokens),
            tokens_file=Path(model.introspection.tokens_file) if model.introspection.tokens_file else None),
        delegation=DelegationConfig(jwks=model.delegation.jwks or None, issuers=tuple(model.delegation.issuers),
                                    audiences=tuple(model.delegation.audiences),
                                    max_depth=model.delegation.max_depth),
        tls_interception=TlsInterceptionConfig(
            ca_cert=Path(model.tls_interception.ca_cert) if model.tls_interception.ca_cert else None,
            ca_key=Path(model.tls_interception.ca_key) if model.tls_interception.ca_key else None,
            leaf_cache_size=model.tls_interception.leaf_cache_size,
            handshake_timeout_seconds=model.tls_interception.handshake_timeout_seconds),
        routes=tuple(_route(route) for route in model.routes),
        raw=raw,
    )


def _route(route: RouteFile) -> Route:
    label = route.labels.get("protocol")
    protocol = "mcp" if route.protocol == "mcp" or (label is not None and str(label).lower() == "mcp") else "http"
    labels = {**route.labels, "protocol": "mcp"} if protocol == "mcp" else dict(route.labels)
    credential = route.credential
    mcp = route.mcp
    return Route(
        name=route.name,
        match=RouteMatch(path_prefix=route.match.path_prefix,
                         host=route.match.host.lower() if route.match.host else None,
                         host_path_prefix=route.match.host_path_prefix),
        upstream=route.upstream,
        labels=labels,
        credential=RouteCredential(
            mode=credential.mode, header=credential.header,
            scheme=credential.scheme if credential.scheme is not None
            else ("Bearer" if credential.header.lower() == "authorization" else ""),
            static_key_file=Path(credential.static_key_file) if credential.static_key_file else None,
            strip_headers=tuple(credential.strip_headers),
            pass_headers=tuple(sorted({h.lower() for h in credential.pass_headers}))),
        allow_tunnel=route.allow_tunnel,
        intercept_tls=route.intercept_tls,
        tls_verify=route.tls.verify,
        ca_bundle=Path(route.tls.ca_bundle) if route.tls.ca_bundle else None,
        timeout_seconds=route.timeout_seconds,
        measures=tuple(Measure(name, tuple(parse_path(p) for p in paths)) for name, paths in route.measures.items()),
        methods=frozenset(route.methods) if route.methods is not None else frozenset(DEFAULT_METHODS),
        protocol=protocol,
        content_encodings=tuple(route.content_encodings),
        mcp=McpOptions() if mcp is None else McpOptions(
            refusal=mcp.refusal,
            tools={name: hints.model_dump(exclude_none=True) for name, hints in mcp.tools.items()},
            trust_server_annotations=mcp.trust_server_annotations),
    )


assert set(MCP_HINTS) == set(ToolHints.model_fields) and CONTENT_CODINGS == ("gzip", "deflate")
