"""Header hygiene: hop-by-hop headers (RFC 9110 section 7.6.1) and the agent's credentials."""

from __future__ import annotations

from collections.abc import Iterable

from multidict import CIMultiDictProxy

from ..problems import Refusal

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade", "proxy-authenticate", "proxy-authorization",
})

# Headers the sidecar itself interprets; they never travel upstream.
SIDECAR_HEADERS = frozenset({"x-agent-task", "x-agent-approval", "x-agent-delegation", "prefer"})

# Headers only the sidecar may set upstream: an agent that sends one is trying to spoof it.
SPOOFABLE = frozenset({"x-agent-decision", "x-agent-credential-jti"})

# Recomputed by the client for the upstream.
FRAMING = frozenset({"host", "content-length", "expect"})

# Headers some upstreams honour as a different method than the one the policy judged.
METHOD_OVERRIDES = frozenset({"x-http-method-override", "x-http-method", "x-method-override"})

# Headers some upstreams honour as a different target than the one the policy judged.
TARGET_OVERRIDES = frozenset({"x-original-url", "x-rewrite-url"})

# What the body or the target is: a Connection option naming one would strip it from the forwarded call only.
END_TO_END_CONTENT = frozenset({"content-type", "content-length", "content-encoding", "transfer-encoding", "host"})

# Claims about the client that only a proxy may make: an agent's are dropped, never forwarded.
PROXY_CLAIMS = frozenset({"forwarded", "x-real-ip", "x-client-ip", "true-client-ip"})
PROXY_CLAIM_PREFIX = "x-forwarded-"


def connection_tokens(headers: CIMultiDictProxy[str]) -> set[str]:
    tokens: set[str] = set()
    for value in headers.getall("connection", ()):
        tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def single(headers: CIMultiDictProxy[str], name: str) -> str | None:
    """A header the sidecar reads; sent twice it is ambiguous, so refused."""
    values = headers.getall(name, ())
    if len(values) > 1:
        raise Refusal("credential_header" if name.lower().startswith("x-agent") else "bad_request",
                      f"header {name} sent more than once")
    return values[0].strip() if values else None


def refuse_meaning_changers(headers: CIMultiDictProxy[str]) -> None:
    """Refuse headers that would make the upstream read another request than the one judged.

    A name with ``_`` is refused because CGI-style servers map it onto the ``-`` spelling
    (``X_Agent_Decision`` becomes ``X-Agent-Decision``).
    """
    named = connection_tokens(headers) & END_TO_END_CONTENT
    if named:
        raise Refusal("header_not_allowed", f"Connection names {sorted(named)[0]}, which says what the body or target is")
    codings = headers.getall("transfer-encoding", ())
    if codings and (len(codings) > 1 or codings[0].strip(" \t").lower() != "chunked"):
        # aiohttp reads "gzip, chunked", ", chunked" or an empty value as chunked or as nothing, and never undoes
        # another coding: the body judged would be the still-coded bytes the agent said were something else.
        raise Refusal("bad_request", "Transfer-Encoding must be exactly chunked (no other transfer coding is read)")
    length = headers.get("content-length")
    if length is not None and len(length.strip(" \t")) > 20:
        # llhttp reads any number of leading zeros; aiohttp's request.content_length (int()) raises past 4300 digits.
        raise Refusal("bad_request", "Content-Length has more than 20 digits")
    for name, value in headers.items():
        if not (name.isascii() and value.isascii()):
            _refuse_if_not_utf8(name, value)
        lower = name.lower()
        if "_" in name:
            raise Refusal("header_not_allowed", f"header names with '_' are refused ({name[:40]})")
        if lower in METHOD_OVERRIDES:
            raise Refusal("method_override", f"{name} would change the method after the decision")
        if lower in TARGET_OVERRIDES:
            raise Refusal("header_not_allowed", f"{name} would change the target after the decision")


def _refuse_if_not_utf8(name: str, value: str) -> None:
    """aiohttp decodes header bytes that are not UTF-8 as lone surrogates (surrogateescape): a value the policy
    input, the audit chain and the credential's binding cannot carry as JSON, and each upstream reads its own way."""
    try:
        name.encode("utf-8")
        value.encode("utf-8")
    except UnicodeEncodeError:
        shown = name.encode("ascii", "backslashreplace").decode("ascii")[:40]
        raise Refusal("bad_request", f"header {shown} is not UTF-8") from None


def is_proxy_claim(name: str) -> bool:
    return name in PROXY_CLAIMS or name.startswith(PROXY_CLAIM_PREFIX)


def forwardable(headers: CIMultiDictProxy[str], credential_headers: Iterable[str],
                also_drop: Iterable[str] = ()) -> tuple[tuple[str, str], ...]:
    """The agent's headers that may reach the upstream and the policy.

    Credentials are stripped, not refused: agent SDKs often send a placeholder
    key. A credential header sent twice is refused: that is never innocent.
    """
    strip = set(credential_headers)
    for name in strip:
        if len(headers.getall(name, ())) > 1:
            raise Refusal("credential_header", f"credential header {name} sent more than once")
    for name in SPOOFABLE:
        if name in headers:
            raise Refusal("credential_header", f"header {name} is set by the sidecar only")
    drop = HOP_BY_HOP | SIDECAR_HEADERS | FRAMING | strip | connection_tokens(headers) | set(also_drop)
    return tuple((name, value) for name, value in headers.items()
                 if name.lower() not in drop and not is_proxy_claim(name.lower()))


def policy_view(headers: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """Lower-cased names; repeated headers joined with ', ' as RFC 9110 allows."""
    view: dict[str, str] = {}
    for name, value in headers:
        key = name.lower()
        view[key] = f"{view[key]}, {value}" if key in view else value
    return view


def response_headers(headers: CIMultiDictProxy[str]) -> list[tuple[str, str]]:
    """Upstream response headers that may travel back to the agent."""
    drop = HOP_BY_HOP | {"content-length", "content-encoding"} | connection_tokens(headers)
    return [(name, value) for name, value in headers.items() if name.lower() not in drop]
