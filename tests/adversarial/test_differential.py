"""Property-based differential test: generated hostile requests against a real sidecar and a reference model.

hypothesis generates request-targets (unreserved and sub-delim characters, valid and invalid ``%XX`` escapes
in both hex cases, ``;``, ``#``, ``?``, dot and empty segments, non-ASCII and control characters), queries,
headers (underscores, duplicates, method overrides, Forwarded), methods and bodies (JSON with duplicate or
case-variant keys, nesting, NaN; form bodies; text) under assorted Content-Types, and sends each raw to one
sidecar (shipped policy, embedded OPA) in front of the raw-socket upstream. Every example must satisfy the
invariant of adversarial_kit (refused cleanly with nothing upstream, or forwarded with the upstream's bytes,
the decision's input.request and the token's binding equal), and must agree with the reference model of
issue 13 (adversarial_kit.canonical_*): what the model refuses is refused, with the model's code when it is
the only thing wrong; what is forwarded went to the model's canonical target.

``make test`` runs a fixed, derandomised set of examples (profile ``ci``); ``make fuzz`` runs the ``fuzz``
profile (HYPOTHESIS_PROFILE=fuzz, thousands of random examples).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from adversarial_kit import (
    ALLOWED_METHODS,
    BASES,
    CRM_HOST,
    Outcome,
    Refuse,
    Stack,
    assert_forwarded,
    assert_refused,
    canonical_component,
    canonical_path,
    exchange,
    expected_upstream_target,
    query_fields,
    query_has_method_field,
)
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

settings.register_profile("ci", max_examples=150, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("fuzz", max_examples=int(os.environ.get("FUZZ_EXAMPLES", "5000")), deadline=None,
                          database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# ---------------------------------------------------------------- the generated request


@dataclass
class Generated:
    method: str
    target: str  # as sent, before encoding
    absolute: bool
    headers: list[tuple[str, str]]
    content_type: str | None
    body: bytes
    task: bool
    chunked: bool = False  # the body sent with Transfer-Encoding: chunked (7-byte chunks) instead of Content-Length
    # Reasons the reference model says the call must be refused, with the code each one calls for.
    must_refuse: list[tuple[str, str]] = field(default_factory=list)
    route: str | None = None
    upstream_target: str | None = None

    def render(self, task_id: str | None) -> bytes:
        lines = [f"{self.method} {self.target} HTTP/1.1", "Host: x", "Connection: close"]
        if task_id is not None:
            lines.append(f"X-Agent-Task: {task_id}")
        lines += [f"{name}: {value}" for name, value in self.headers]
        if self.content_type is not None:
            lines.append(f"Content-Type: {self.content_type}")
        if self.chunked:
            lines.append("Transfer-Encoding: chunked")
            pieces = [self.body[i:i + 7] for i in range(0, len(self.body), 7)]
            framed = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"
            return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + framed
        if self.body or self.method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + self.body


UNRESERVED_ATOMS = list("abcxyzAZ09-._~")
SUB_DELIMS = list("!$&'()*+,=:@")
FORBIDDEN = list('"<>\\^`{|} ;') + ["\t", "\x01", "\x7f", "\u00e9", "\u4e2d"]
WORDS = ["customers", "42", "refunds", "notes", "r", "funds", "roles", "admin", "mcp", "..", ".", "", "payments"]


@st.composite
def escapes(draw: st.DrawFn, valid_only: bool = False) -> str:
    kind = draw(st.sampled_from(["valid", "valid", "valid", "unreserved"] + ([] if valid_only else ["invalid"])))
    if kind == "invalid":
        return draw(st.sampled_from(["%", "%4", "%zz", "%G1", "%4g", "%%"]))
    if kind == "unreserved":
        value = ord(draw(st.sampled_from("aeoz09-._~")))
    else:
        value = draw(st.integers(0, 255))
    hex_digits = f"{value:02x}"
    return "%" + draw(st.sampled_from([hex_digits, hex_digits.upper(), hex_digits[0].upper() + hex_digits[1]]))


def atom() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(WORDS),
        st.sampled_from(UNRESERVED_ATOMS),
        st.sampled_from(SUB_DELIMS),
        escapes(),
        st.sampled_from(FORBIDDEN + ["#", "?", "/", "//"]),
    )


def weighted_atom() -> st.SearchStrategy[str]:
    """Mostly harmless, so that many examples get past the parser and reach the policy and the upstream."""
    return st.one_of(st.sampled_from(WORDS[:10]), st.sampled_from(WORDS[:10]), st.sampled_from(WORDS[:10]), atom())


segment = st.lists(weighted_atom(), min_size=0, max_size=3).map("".join)
query_part = st.lists(
    st.tuples(st.sampled_from(["fields", "q", "limit", "_method", "%5Fmethod", "a", "next", ""]),
              st.lists(weighted_atom(), max_size=3).map("".join)),
    max_size=3,
).map(lambda pairs: "&".join(f"{k}={v}" for k, v in pairs))

METHODS = ["GET"] * 6 + ["POST"] * 4 + ["PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "PROPFIND", "FOO", "get"]
HEADER_NAMES = ["Accept", "User-Agent", "X-Request-Id", "X_Custom", "X-HTTP-Method-Override", "X-HTTP-Method",
                "X-Method-Override", "Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Real-IP", "X-Original-URL",
                "X-Rewrite-URL", "Authorization", "Content-Encoding", "X-Agent-Decision", "Content-Type", "X Bad", "X-A\"b", "Connection", "X-Client-IP", "True-Client-IP"]
HEADER_VALUES = ["1", "DELETE", "text/plain", "keep-alive, X-Forwarded-For", "close, Content-Type", "Content-Length", "for=10.0.0.1;host=payments.example.com", "/payments/transfers", "gzip",
                 "Bearer agent-secret", "text/html, */*", "a b", "x\x00y", "caf\u00e9", "a\rb", "a\x7fb"]
CONTENT_TYPES = [None, "application/json", "application/json", "text/plain", "text/json", "application/octet-stream",
                 "application/x-www-form-urlencoded", "application/vnd.crm+json", "application/json; charset=utf-8"]
KEYS = ["amount", "amount", "Amount", "note", "items", "a", "\\u0061mount"]


def json_text(depth: int = 0) -> st.SearchStrategy[str]:
    scalar = st.one_of(st.integers(0, 60).map(str), st.sampled_from(['"hi"', "true", "null", "1.5", "NaN", "Infinity",
                                                                      "-Infinity", "1e400", "100000"]))
    if depth >= 2:
        return scalar
    inner = json_text(depth + 1)
    objects = st.lists(st.tuples(st.sampled_from(KEYS), inner), max_size=3).map(
        lambda pairs: "{" + ",".join(f'"{k}":{v}' for k, v in pairs) + "}")
    arrays = st.lists(inner, max_size=3).map(lambda items: "[" + ",".join(items) + "]")
    return st.one_of(scalar, objects, objects, arrays)


form_text = st.lists(
    st.tuples(st.sampled_from(["amount", "note", "_method", "%61mount", "n"]), st.sampled_from(["1", "10", "a+b", "DELETE", "%41"])),
    min_size=1, max_size=3,
).map(lambda pairs: "&".join(f"{k}={v}" for k, v in pairs))
text_bodies = st.sampled_from(["hello", "{not json", "[1,2]", "1", '{"amount":5}', "tools/list"])


MILD_ATOMS = st.one_of(st.sampled_from(["customers", "42", "notes", "refunds", "roles", "r", "x"]),
                       st.sampled_from(UNRESERVED_ATOMS + SUB_DELIMS), escapes(valid_only=True))
MILD_HEADERS = ["Accept", "User-Agent", "X-Request-Id", "Forwarded", "X-Forwarded-For", "X-Real-IP", "Authorization"]
MILD_VALUES = ["1", "text/html, */*", "for=10.0.0.1", "Bearer agent-secret", "caf\u00e9", "a b"]
mild_json = st.dictionaries(st.sampled_from(["amount", "note", "text", "n"]),
                            st.one_of(st.integers(0, 40), st.sampled_from(["hi", "a b"]), st.none()), max_size=3).map(
    lambda d: json.dumps(d, separators=(",", ":")))


@st.composite
def requests(draw: st.DrawFn) -> Generated:
    """Half the examples are mild (they mostly reach the policy and the upstream), half hostile."""
    mild = draw(st.booleans())
    method = draw(st.sampled_from(["GET", "GET", "GET", "POST", "PUT", "HEAD", "OPTIONS"] if mild else METHODS))
    absolute = draw(st.integers(0, 9)) == 0
    userinfo = "" if mild or not absolute else draw(st.sampled_from(["", "", "", "user@", "a:b@"]))
    prefix = draw(st.sampled_from(["/crm", "/crm", "/payments", "/plain", "/cr%6D"] if mild else
                                  ["/crm", "/crm", "/payments", "/tools", "/plain", "/readonly", "/cr%6D", "/nope", "/CRM",
                                   "/crmx"]))
    atoms = MILD_ATOMS if mild else weighted_atom()
    segments = draw(st.lists(st.lists(atoms, min_size=1 if mild else 0, max_size=3).map("".join), max_size=4))
    path = ("" if absolute else prefix) + "".join("/" + s for s in segments)
    if mild:
        query = draw(st.one_of(st.none(), st.lists(st.tuples(st.sampled_from(["fields", "q", "limit", "next"]),
                                                             st.lists(MILD_ATOMS, max_size=3).map("".join)),
                                                   min_size=1, max_size=3).map(
            lambda pairs: "&".join(f"{k}={v}" for k, v in pairs))))
    else:
        query = draw(st.one_of(st.none(), query_part))
    target = path + (f"?{query}" if query is not None else "")
    if absolute:
        # An absolute-form target with no path at all (http://host) may be refused or sent to "/": not drawn.
        target = f"http://{userinfo}{CRM_HOST}" + (target if target.startswith("/") else "/" + target)
    elif not target.startswith("/"):
        target = "/" + target
    names, values = (MILD_HEADERS, MILD_VALUES) if mild else (HEADER_NAMES, HEADER_VALUES)
    headers = draw(st.lists(st.tuples(st.sampled_from(names), st.sampled_from(values)), max_size=3))
    content_type = draw(st.sampled_from(CONTENT_TYPES))
    kind = draw(st.sampled_from(["none", "json", "json", "form", "text"]))
    if kind == "json":
        body = draw(mild_json if mild else json_text()).encode()
    elif kind == "form":
        body = draw(form_text).encode()
    elif kind == "text":
        body = draw(text_bodies).encode()
    else:
        body = b""
    task = draw(st.integers(0, 3)) > 0
    chunked = bool(body) and draw(st.integers(0, 4)) == 0
    generated = Generated(method, target, absolute, headers, content_type, body, task, chunked)
    model(generated)
    return generated


# ---------------------------------------------------------------- the reference model (issue 13)


class _BadJson(Exception):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key.lower() in seen:
            raise _BadJson("duplicate key")
        seen.add(key.lower())
    return dict(pairs)


def _constant(name: str) -> Any:
    raise _BadJson(name)


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _BadJson("overflow")
    return value


def strict_json(body: bytes) -> tuple[bool, Any]:
    """(parses, value) by the rules of issue 13; raises _BadJson for what must be refused whatever the label."""
    try:
        return True, json.loads(body, object_pairs_hook=_pairs, parse_constant=_constant, parse_float=_finite)
    except _BadJson:
        raise
    except ValueError:
        return False, None


# Headers a server must see once (aiohttp's parser refuses a second one, as RFC 9110 5.3 allows): a second
# Content-Type in particular would let the policy and the upstream read the body differently.
SINGLETONS = ("content-type", "user-agent", "host", "content-length", "content-location", "content-range", "etag",
              "max-forwards", "server", "transfer-encoding")


# A Connection option naming one of these would make the upstream read the body or target without it.
CONTENT_HEADERS = frozenset({"content-type", "content-length", "content-encoding", "transfer-encoding", "host"})
HEADER_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


# Routes that list their methods (adversarial_kit.route_config); the others take ALLOWED_METHODS.
ROUTE_METHODS = {"readonly": frozenset({"GET", "HEAD", "PROPFIND"})}


def model(generated: Generated) -> None:
    reasons = generated.must_refuse
    method_refused = ("method_not_allowed", generated.method)
    names = [name.lower() for name, _ in generated.headers] + (["content-type"] if generated.content_type else [])
    for singleton in SINGLETONS:
        if names.count(singleton) > 1:
            reasons.append(("bad_request", f"{singleton} sent twice"))
    for name, value in generated.headers:
        lowered = name.lower()
        if not HEADER_TOKEN.fullmatch(name):
            reasons.append(("bad_request", f"header name {name!r} is not a token"))
        elif "_" in name:
            reasons.append(("header_not_allowed", name))
        elif lowered in ("x-http-method-override", "x-http-method", "x-method-override"):
            reasons.append(("method_override", name))
        elif lowered in ("x-original-url", "x-rewrite-url"):
            reasons.append(("header_not_allowed", name))
        elif lowered == "content-encoding" and value.lower() != "identity":
            reasons.append(("unsupported_encoding", name))
        elif lowered == "connection" and {t.strip().lower() for t in value.split(",")} & CONTENT_HEADERS:
            reasons.append(("header_not_allowed", f"Connection: {value}"))
        elif lowered == "x-agent-decision":
            reasons.append(("credential_header", name))
        elif lowered == "authorization" and names.count("authorization") > 1:
            reasons.append(("credential_header", name))
        if any(ord(c) < 0x20 and c != "\t" or ord(c) == 0x7F for c in value):
            reasons.append(("bad_request", f"control character in {name}"))
    if generated.absolute:
        authority, _, rest = generated.target[len("http://"):].partition("/")
        rest = "/" + rest
        try:
            if "@" in authority:
                raise Refuse("bad_request", "userinfo")
            if "#" in rest:
                raise Refuse("bad_request", "fragment")
            path, question, query = rest.partition("?")
            canonical = canonical_path(path or "/")
            canonical_q = canonical_component(query, query=True) if question else None
            if canonical_q is not None and query_has_method_field(canonical_q):
                raise Refuse("method_override", "_method")
            generated.route = "crm"
            generated.upstream_target = BASES["crm"] + canonical + (f"?{canonical_q}" if canonical_q else "")
        except Refuse as refuse:
            reasons.append((refuse.code, str(refuse)))
    else:
        try:
            found = expected_upstream_target(generated.target)
        except Refuse as refuse:
            reasons.append((refuse.code, str(refuse)))
        else:
            if found is None:
                reasons.append(("no_route", generated.target))
            else:
                generated.route, generated.upstream_target = found
    if generated.method not in ROUTE_METHODS.get(generated.route or "", ALLOWED_METHODS):
        reasons.append(method_refused)
    media = (generated.content_type or "").split(";", 1)[0].strip().lower()
    # On an MCP route only the bodiless Streamable HTTP methods (GET opens the event stream, DELETE ends the
    # session) may come without a message; any body there must be well-formed JSON-RPC 2.0.
    bodiless = generated.method in ("GET", "HEAD", "OPTIONS", "DELETE") and not generated.body
    if generated.route == "tools" and not bodiless and not _jsonrpc(generated.body):
        reasons.append(("bad_request", "not well-formed JSON-RPC 2.0 on an MCP route"))
    if generated.body:
        if media == "application/x-www-form-urlencoded":
            try:
                canonical_component(generated.body.decode("utf-8", "replace"), query=True)
            except Refuse as refuse:
                reasons.append(("bad_request", f"form body: {refuse}"))
            try:
                if strict_json(generated.body)[0]:
                    reasons.append(("bad_request", "a form body that is also JSON"))
            except _BadJson as bad:
                reasons.append(("bad_request", f"a form body that is also (bad) JSON: {bad}"))
            try:
                fields = parse_qsl(generated.body.decode("ascii"), keep_blank_values=True, strict_parsing=True)
            except (ValueError, UnicodeDecodeError):
                fields = []
            field_names = [name for name, _ in fields]
            if len(set(field_names)) != len(field_names):
                reasons.append(("bad_request", "duplicate form field"))
            if "_method" in field_names:
                reasons.append(("method_override", "_method form field"))
        else:
            labelled = media in ("application/json", "text/json") or media.endswith("+json")
            try:
                parses, _ = strict_json(generated.body)
            except _BadJson as bad:
                reasons.append(("bad_request", f"JSON: {bad}"))
            else:
                if labelled and not parses:
                    reasons.append(("bad_request", "labelled JSON that does not parse"))


def _jsonrpc(body: bytes) -> bool:
    try:
        parses, value = strict_json(body)
    except _BadJson:
        return False
    if not parses:
        return False
    items = value if isinstance(value, list) else [value]
    return bool(items) and all(isinstance(item, dict) and item.get("jsonrpc") == "2.0"
                               and isinstance(item.get("method"), str) for item in items)


def expected_policy_body(generated: Generated) -> tuple[Any, bool]:
    """What the policy must see of a forwarded body: JSON whatever its label, a form as names to values, else
    null and unreadable (an empty body is null and readable)."""
    if not generated.body:
        return None, True
    media = (generated.content_type or "").split(";", 1)[0].strip().lower()
    if media == "application/x-www-form-urlencoded":
        return dict(parse_qsl(generated.body.decode("utf-8"), keep_blank_values=True)), True
    parses, value = strict_json(generated.body)
    return (value, True) if parses else (None, False)


# The codes the policy gives (and, for a call it holds, the approvals already waiting: thousands of generated calls
# of one agent fill approvals.max_pending_per_agent); any other refusal of a call the model finds nothing wrong
# with is a disagreement.
POLICY_CODES = frozenset({"denied", "approval_required", "too_many_pending_approvals"})


# ---------------------------------------------------------------- the test



def check(stack: Stack, generated: Generated, outcome: Outcome) -> None:
    mcp_route = generated.route == "tools"
    note(f"request: {generated.render('t-x' if generated.task else None)!r}")
    note(f"model: route={generated.route} target={generated.upstream_target} must_refuse={generated.must_refuse}")
    note(f"outcome: {outcome.describe()}")
    if outcome.forwarded or (outcome.answer.status < 400 and not mcp_route):
        event("forwarded")
        assert not generated.must_refuse, f"forwarded although it must be refused: {generated.must_refuse}"
        received = assert_forwarded(stack, outcome, target=generated.upstream_target, body=generated.body,
                                    method=generated.method)
        decision = stack.decision_event(received.header("x-agent-decision")[0])
        assert decision is not None
        body, readable = expected_policy_body(generated)
        judged = decision["input"]["request"]
        assert judged["body"] == body, f"the policy saw body {judged['body']!r}, the model reads {body!r}"
        assert judged.get("body_readable", True) is readable, judged.get("body_readable")
        query: dict[str, list[str]] = {}
        for name, value in query_fields(received.target.partition("?")[2]):
            query.setdefault(name, []).append(value)
        assert judged["query"] == query, f"the policy saw query {judged['query']!r}, the model reads {query!r}"
        return
    code = assert_refused(outcome, code=None, mcp_route=mcp_route, head=generated.method == "HEAD")
    event(f"refused {code}")
    assert code != "internal_error" and outcome.answer.status != 500, outcome.describe()
    if code is None:
        return  # HEAD: no body, no code to compare
    codes = {reason_code for reason_code, _ in generated.must_refuse}
    if not codes:
        assert code in POLICY_CODES, f"refused with {code}, the model finds nothing wrong: {outcome.describe()}"
    if len(codes) == 1 and not (mcp_route and generated.body):
        # One thing wrong: the refusal names it. (On an MCP route the JSON-RPC checks may speak first.)
        [expected] = codes
        assert code == expected, f"expected {expected} for {generated.must_refuse}, got {code}"


@given(generated=requests())
def test_every_generated_request_is_refused_cleanly_or_forwarded_exactly(stack: Stack, generated: Generated) -> None:
    task = stack.open_task() if generated.task else None
    outcome = exchange(stack, generated.render(task))
    check(stack, generated, outcome)
