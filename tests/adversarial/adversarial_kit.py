"""What the adversarial tests share: a real sidecar (shipped policy, embedded OPA) in front of a raw-socket
upstream, a raw-socket agent, and the invariant every call must satisfy.

The sidecar and the upstream run on their own event loop in a background thread, so that the tests (a
corpus loop, hypothesis examples) drive them with plain blocking sockets, one byte string at a time.

The invariant (SPEC "Quality bars", issue 13): a call is either

- refused: status >= 400, ``application/problem+json`` (a JSON-RPC error carrying the problem on an MCP
  route), a ``code``, no traceback anywhere, and nothing reaches the upstream; or
- forwarded: the upstream received exactly one request whose method, request-target and body are, byte
  for byte, what the decision event's ``input.request`` describes and what the minted token's ``req``
  claim binds (checked by ``sidecar.verifier.check_binding`` and independently with jwcrypto).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import socket
import sys
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import httpx
from jwcrypto import jwk as jose_jwk
from jwcrypto import jwt as jose_jwt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import SHIPPED_POLICY, RunningSidecar, free_port, start_sidecar  # noqa: E402
from raw_upstream import RawUpstream, Received  # noqa: E402

from sidecar.config import ConfigError, parse_config  # noqa: E402
from sidecar.credentials.minter import request_binding  # noqa: E402
from sidecar.verifier import CredentialRejected, check_binding  # noqa: E402

T = TypeVar("T")

# Each route's upstream has a base path unlike its prefix, so a target forwarded without the prefix
# swapped for the base path is caught.
BASES = {"crm": "/api/crm", "payments": "/api/payments", "tools": "/api/tools", "plain": "/api/plain",
         "readonly": "/api/readonly"}
PREFIXES = {"crm": "/crm", "payments": "/payments", "tools": "/tools", "plain": "/plain", "readonly": "/readonly"}
CRM_HOST = "crm.example.com"

ALLOWED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# Headers that must never reach an upstream: they change what the call means to an ordinary server.
NEVER_UPSTREAM = frozenset({
    "forwarded", "x-real-ip", "x-client-ip", "true-client-ip", "x-http-method-override", "x-http-method", "x-method-override",
    "x-original-url", "x-rewrite-url", "x-agent-task", "x-agent-approval", "x-agent-delegation",
    "transfer-encoding",
})


def route_config(upstream: str, *, mcp_protocol: bool) -> list[dict[str, Any]]:
    """The routes of the adversarial tests. ``mcp_protocol``: the tools route says ``protocol: mcp``."""
    tools: dict[str, Any] = {"name": "tools", "match": {"path_prefix": "/tools"}, "upstream": upstream + BASES["tools"]}
    if mcp_protocol:
        tools["protocol"] = "mcp"
    else:
        tools["labels"] = {"protocol": "mcp"}
    return [
        {"name": "crm", "match": {"path_prefix": "/crm", "host": CRM_HOST}, "upstream": upstream + BASES["crm"],
         "labels": {"environment": "dev"}},
        {"name": "payments", "match": {"path_prefix": "/payments"}, "upstream": upstream + BASES["payments"],
         "labels": {"environment": "prod", "reversible": False}},
        tools,
        {"name": "plain", "match": {"path_prefix": "/plain"}, "upstream": upstream + BASES["plain"]},
        # A route that lists its methods: anything else is method_not_allowed there.
        {"name": "readonly", "match": {"path_prefix": "/readonly"}, "upstream": upstream + BASES["readonly"],
         "methods": ["GET", "HEAD", "PROPFIND"]},
    ]


def sidecar_settings(tmp: Path, upstream: str, *, mcp_protocol: bool) -> dict[str, Any]:
    return {
        "listeners": {"proxy": f"127.0.0.1:{free_port()}", "admin": f"127.0.0.1:{free_port()}",
                      "metrics": f"127.0.0.1:{free_port()}"},
        "state_dir": str(tmp / "state"),
        "limits": {"max_body_bytes": 1024 * 1024},
        "policy": {"engine": "embedded", "rego_dir": str(SHIPPED_POLICY), "timeout_ms": 5000},
        "identity": {"static": "spiffe://test/ns/agents/sa/adversary"},
        "routes": route_config(upstream, mcp_protocol=mcp_protocol),
    }


def protocol_key_accepted(tmp: Path) -> bool:
    """Whether sidecar/config.py accepts ``protocol: mcp`` on a route yet."""
    try:
        parse_config(sidecar_settings(tmp, "http://127.0.0.1:1", mcp_protocol=True), tmp / "probe.yaml")
    except ConfigError:
        return False
    return True


# ---------------------------------------------------------------- log capture


class LogCapture(logging.Handler):
    """Every record the process logs while the stack runs; a traceback anywhere is a failure."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._lock_records = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock_records:
            self.records.append(record)

    def mark(self) -> int:
        with self._lock_records:
            return len(self.records)

    def since(self, mark: int) -> list[logging.LogRecord]:
        with self._lock_records:
            return self.records[mark:]


def tracebacks(records: list[logging.LogRecord]) -> list[str]:
    found = []
    for record in records:
        text = record.getMessage()
        if record.exc_info or record.exc_text or "Traceback (most recent call last)" in text:
            found.append(f"{record.name}:{record.levelname}: {text[:300]}")
    return found


# ---------------------------------------------------------------- the stack


class Stack:
    """A raw upstream and a real sidecar on their own loop in a background thread."""

    def __init__(self, tmp: Path, **settings: Any) -> None:
        self.tmp = tmp
        self.settings = settings  # top-level config sections added to (or replacing) the defaults
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="adversarial-stack", daemon=True)
        self.upstream = RawUpstream()
        self.running: RunningSidecar | None = None
        self.mcp_protocol = False
        self.logs = LogCapture()
        self._root_level = logging.NOTSET
        self._jwks: dict[str, Any] | None = None
        self._audit_offset = 0
        self._decisions: dict[str, dict[str, Any]] = {}

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def start(self) -> Stack:
        root = logging.getLogger()
        root.addHandler(self.logs)
        self._root_level = root.level
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
        self.thread.start()
        self.run(self.upstream.start())
        self.mcp_protocol = protocol_key_accepted(self.tmp)
        config = {**sidecar_settings(self.tmp, self.upstream.base, mcp_protocol=self.mcp_protocol), **self.settings}
        self.running = self.run(start_sidecar(self.tmp, config))
        return self

    def stop(self) -> None:
        try:
            if self.running is not None:
                self.run(self.running.sidecar.stop())
            self.run(self.upstream.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(30)
            logging.getLogger().removeHandler(self.logs)
            logging.getLogger().setLevel(self._root_level)

    @property
    def sidecar(self) -> RunningSidecar:
        assert self.running is not None
        return self.running

    @property
    def proxy_port(self) -> int:
        port: int = self.sidecar.sidecar.config.proxy.port
        return port

    @property
    def proxy_authority(self) -> str:
        return f"127.0.0.1:{self.proxy_port}"

    @property
    def upstream_origin(self) -> str:
        return self.upstream.base

    def open_task(self, intent: str = "refund order 7 for customer 42") -> str:
        response = httpx.post(f"{self.sidecar.admin}/v1/tasks", json={"intent": intent, "ttl_seconds": 600}, timeout=30)
        assert response.status_code == 201, response.text
        task_id: str = response.json()["id"]
        return task_id

    def jwks(self) -> dict[str, Any]:
        if self._jwks is None:
            response = httpx.get(f"{self.sidecar.admin}/.well-known/jwks.json", timeout=30)
            assert response.status_code == 200, response.text
            self._jwks = response.json()
        return self._jwks

    def decision_event(self, decision_id: str) -> dict[str, Any] | None:
        """The ``type == "decision"`` event with this id in the audit chain (read incrementally).

        An allow event is on disk before the call leaves; a refusal's is queued without waiting, so when it
        is not there yet, a barrier event is written through the same queue: once it is on disk, so is
        everything queued before it."""
        self._read_decisions()
        if decision_id not in self._decisions:
            self.run(self.sidecar.sidecar.path.audit.record({"type": "test.barrier"}))
            self._read_decisions()
        return self._decisions.get(decision_id)

    def _read_decisions(self) -> None:
        with self.sidecar.audit_path.open("rb") as handle:
            handle.seek(self._audit_offset)
            data = handle.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._audit_offset += len(complete)
        for line in complete.splitlines():
            event = json.loads(line)
            if event.get("type") == "decision" and isinstance(event.get("decision_id"), str):
                self._decisions[event["decision_id"]] = event


# ---------------------------------------------------------------- the raw agent


@dataclass
class Answer:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    raw_head: bytes = b""

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    @property
    def media_type(self) -> str:
        return (self.header("content-type") or "").split(";", 1)[0].strip().lower()

    def json(self) -> Any:
        return json.loads(self.body)


def send_raw(port: int, data: bytes, *, method_hint: str | None = None, timeout: float = 30.0) -> Answer:
    """Send these bytes on a fresh connection and read one response (by its own framing, else to EOF).

    A connection closed before any response is an Answer with status 0."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before reading everything
        reader = sock.makefile("rb")
        try:
            return read_answer(reader, method_hint)
        except (ConnectionResetError, socket.timeout) as exc:
            return Answer(0, f"no answer: {type(exc).__name__}", [], b"")


def read_answer(reader: Any, method_hint: str | None) -> Answer:
    """One response from a socket file (several in a row on a kept-alive connection)."""
    status_line = reader.readline(65536)
    if not status_line:
        return Answer(0, "connection closed without an answer", [], b"")
    parts = status_line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    reason = parts[2] if len(parts) > 2 else ""
    head = [status_line]
    headers: list[tuple[str, str]] = []
    while True:
        line = reader.readline(65536)
        head.append(line)
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    answer = Answer(status, reason, headers, b"", b"".join(head))
    if method_hint == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return answer
    encoding = (answer.header("transfer-encoding") or "").lower()
    length = answer.header("content-length")
    if "chunked" in encoding:
        chunks = []
        while True:
            size = int(reader.readline(65536).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while reader.readline(65536) not in (b"\r\n", b"\n", b""):
                    pass
                break
            chunks.append(reader.read(size))
            reader.readline(65536)
        answer.body = b"".join(chunks)
    elif length is not None and length.isdigit():
        answer.body = reader.read(int(length))
    else:
        answer.body = reader.read()
    return answer


def request_method(data: bytes) -> str:
    return data.split(b" ", 1)[0].decode("latin-1", "replace")


# ---------------------------------------------------------------- the reference model of issue 13

UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
PATH_RAW = UNRESERVED | frozenset("!$&'()*+,=:@/%")
QUERY_RAW = PATH_RAW | frozenset("?")
HEX = frozenset("0123456789abcdefABCDEF")


class Refuse(Exception):
    def __init__(self, code: str, why: str) -> None:
        super().__init__(f"{code}: {why}")
        self.code = code


def canonical_component(text: str, *, query: bool) -> str:
    """RFC 3986 6.2.2 once: %XX of unreserved decoded, other escapes upper-cased; ambiguous text refused."""
    allowed = QUERY_RAW if query else PATH_RAW
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char not in allowed:
            raise Refuse("bad_request", f"raw {char!r} in the {'query' if query else 'path'}")
        if char != "%":
            out.append(char)
            i += 1
            continue
        pair = text[i + 1:i + 3]
        if len(pair) != 2 or not set(pair) <= HEX:
            raise Refuse("bad_request", "invalid percent-escape")
        value = int(pair, 16)
        if value < 0x20 or value == 0x7F:
            raise Refuse("bad_request", "escaped control character")
        if not query and chr(value) in "/\\%;":
            raise Refuse("bad_request", f"escaped {chr(value)!r} in the path")
        out.append(chr(value) if chr(value) in UNRESERVED else "%" + pair.upper())
        i += 3
    return "".join(out)


def canonical_path(path: str) -> str:
    canonical = canonical_component(path, query=False)
    segments = canonical.split("/")[1:]
    for index, segment in enumerate(segments):
        if segment in (".", ".."):
            raise Refuse("bad_request", "dot segment")
        if segment == "" and index != len(segments) - 1:
            raise Refuse("bad_request", "empty segment")
    return canonical


def query_fields(canonical_query: str) -> list[tuple[str, str]]:
    """The query as the policy and most servers read it (``+`` as space, escapes decoded); escapes that do not
    decode to UTF-8 would be read differently by different servers: refused."""
    try:
        return parse_qsl(canonical_query, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise Refuse("bad_request", "a query escape is not UTF-8") from None


def query_has_method_field(canonical_query: str) -> bool:
    return any(name == "_method" for name, _ in query_fields(canonical_query))


def canonical_origin_target(target: str) -> tuple[str, str | None]:
    """(canonical path, canonical query or None) of an origin-form target, or Refuse."""
    if "#" in target:
        raise Refuse("bad_request", "fragment")
    path, question, query = target.partition("?")
    if not path.startswith("/"):
        raise Refuse("bad_request", "not origin-form")
    canonical = canonical_path(path)
    canonical_q = canonical_component(query, query=True) if question else None
    if canonical_q is not None and query_has_method_field(canonical_q):
        raise Refuse("method_override", "_method query parameter")
    return canonical, canonical_q


def expected_upstream_target(target: str) -> tuple[str, str] | None:
    """For an origin-form target under one of our prefixes: (route, exact target the upstream must receive).

    None when the target is under no route (no_route). Raises Refuse when issue 13 says refuse."""
    path, query = canonical_origin_target(target)
    for route, prefix in PREFIXES.items():
        if path == prefix or path.startswith(prefix + "/"):
            rest = path[len(prefix):] or "/"
            return route, BASES[route] + rest + (f"?{query}" if query else "")  # an empty query: no "?"
    return None


# ---------------------------------------------------------------- the invariant


@dataclass
class Outcome:
    """What one call did: the answer, and the upstream request it caused (if any)."""

    answer: Answer
    forwarded: list[Received]
    logs: list[logging.LogRecord] = field(default_factory=list)

    def describe(self) -> str:
        body = self.answer.body[:600].decode("utf-8", "replace")
        seen = [f"{r.request_line!r} body={r.body[:200]!r}" for r in self.forwarded]
        return f"status={self.answer.status} type={self.answer.media_type} body={body!r} upstream={seen}"


def exchange(stack: Stack, data: bytes) -> Outcome:
    """Send one raw request; what came back and what reached the upstream because of it."""
    stack.upstream.drain()
    before = len(stack.upstream.received)
    mark = stack.logs.mark()
    answer = send_raw(stack.proxy_port, data, method_hint=request_method(data))
    # The upstream records a request before it answers, and the sidecar answers a forwarded call only
    # after the upstream did (or failed): so once the answer is here, everything it caused is recorded.
    forwarded = stack.upstream.received[before:]
    return Outcome(answer, list(forwarded), stack.logs.since(mark))


MCP_PROBLEM_KEY = "dev.agent-sidecar/problem"


def mcp_problems(document: Any) -> list[dict[str, Any]] | None:
    """The problem document of every JSON-RPC response in an MCP answer, or None when one has none.

    A refused MCP message is answered in-band (sidecar/proxy/mcp_refusal.py): a tools/call as an error result
    with the problem in ``result._meta``, anything else as a JSON-RPC error with the problem in ``error.data``."""
    responses = document if isinstance(document, list) else [document]
    problems: list[dict[str, Any]] = []
    for response in responses:
        if not isinstance(response, dict):
            return None
        problem: Any = None
        if isinstance(response.get("error"), dict):
            problem = response["error"].get("data")
        elif isinstance(response.get("result"), dict) and response["result"].get("isError") is True:
            problem = (response["result"].get("_meta") or {}).get(MCP_PROBLEM_KEY)
        if not isinstance(problem, dict) or not isinstance(problem.get("code"), str):
            return None
        problems.append(problem)
    return problems or None


def refused_problem(answer: Answer, *, mcp_route: bool) -> dict[str, Any] | None:
    """The refusal's problem document: problem+json, or on an MCP route the in-band JSON-RPC answer."""
    try:
        document = answer.json()
    except ValueError:
        return None
    if answer.media_type == "application/problem+json" and isinstance(document, dict):
        return document if isinstance(document.get("code"), str) else None
    if mcp_route and answer.media_type == "application/json":
        problems = mcp_problems(document)
        return problems[0] if problems else None
    return None


def refusal_code(answer: Answer, *, mcp_route: bool) -> str | None:
    problem = refused_problem(answer, mcp_route=mcp_route)
    return str(problem["code"]) if problem else None


def assert_refused(outcome: Outcome, *, code: str | None, mcp_route: bool = False, canaries: tuple[bytes, ...] = (),
                   head: bool = False) -> str | None:
    """Refused: >= 400, problem+json with a code (the given one when not None), nothing upstream, no traceback.

    On an MCP route a policy refusal may be answered in-band at 200 (every JSON-RPC response carrying the problem).

    Returns the code (None for an answer to HEAD, which has no body)."""
    answer = outcome.answer
    assert not outcome.forwarded, f"refused but the upstream received something: {outcome.describe()}"
    if not (mcp_route and answer.status == 200 and answer.media_type == "application/json"):
        assert answer.status >= 400, f"expected a refusal{f' ({code})' if code else ''}, got {outcome.describe()}"
    if head:
        # The answer to HEAD has no body (RFC 9110 9.3.2): only its status and Content-Type can be checked.
        assert answer.media_type in ("application/problem+json", "application/json"), outcome.describe()
        assert not tracebacks(outcome.logs), f"traceback logged: {tracebacks(outcome.logs)}"
        return None
    found = refusal_code(answer, mcp_route=mcp_route)
    assert found is not None, f"a refusal must be application/problem+json with a code: {outcome.describe()}"
    if code is not None:
        assert found == code, f"expected code {code!r}, got {found!r}: {outcome.describe()}"
    assert b"Traceback" not in answer.body, outcome.describe()
    for canary in canaries:
        assert canary.lower() not in (answer.raw_head + answer.body).lower(), f"the answer echoes the request: {outcome.describe()}"
        logged = [r.getMessage() for r in outcome.logs if canary.lower().decode() in r.getMessage().lower()]
        assert not logged, f"the log echoes the request: {logged}"
    assert not tracebacks(outcome.logs), f"traceback logged: {tracebacks(outcome.logs)}"
    return found


_MISSING = object()


def judged_value(document: dict[str, Any], key: str) -> Any:
    """``key`` names a field of ``input.request``, or (starting with ``/``) a JSON pointer into the whole input."""
    if not key.startswith("/"):
        return document["request"].get(key, _MISSING)
    value: Any = document
    for part in key[1:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def assert_judged(event: dict[str, Any], expected: dict[str, Any] | None) -> None:
    """The decision event's input has these values (see judged_value for the keys)."""
    for key, value in (expected or {}).items():
        found = judged_value(event["input"], key)
        shown = "(absent)" if found is _MISSING else repr(found)
        assert found is not _MISSING and found == value, f"input {key}: judged {shown}, expected {value!r}"


def bearer_token(received: Received) -> str:
    values = received.header("authorization")
    assert len(values) == 1, f"expected exactly one Authorization header upstream, got {len(values)}"
    scheme, _, token = values[0].partition(" ")
    assert scheme == "Bearer" and token, "the upstream credential is not a Bearer token"
    return token


def jwcrypto_claims(token: str, jwks: dict[str, Any]) -> dict[str, Any]:
    """What a tool does with an independent JOSE library: signature against the served JWKS, iss, exp, nbf."""
    keyset = jose_jwk.JWKSet.from_json(json.dumps(jwks))
    checked = jose_jwt.JWT(jwt=token, key=keyset, algs=["ES256", "EdDSA"],
                           check_claims={"iss": "agent-sidecar", "exp": None, "nbf": None})
    claims: dict[str, Any] = json.loads(checked.claims)
    return claims


def split_target(target: str) -> tuple[str, str | None]:
    path, question, query = target.partition("?")
    return path, (query if question else None)


def assert_forwarded(stack: Stack, outcome: Outcome, *, target: str | None = None, body: bytes | None = None,
                     method: str | None = None, policy: dict[str, Any] | None = None,
                     absent_headers: tuple[str, ...] = ()) -> Received:
    """Forwarded, and the upstream's bytes, the decision's input.request and the token's binding agree."""
    answer = outcome.answer
    assert len(outcome.forwarded) == 1, f"expected exactly one forwarded request: {outcome.describe()}"
    assert answer.status == 200, f"forwarded, yet the agent got {outcome.describe()}"
    received = outcome.forwarded[0]
    assert received.version == "HTTP/1.1", received.request_line
    if method is not None:
        assert received.method == method, f"method: upstream got {received.method}, expected {method}"
    if target is not None:
        assert received.target == target, f"target: upstream got {received.target!r}, expected {target!r}"
    if body is not None:
        assert received.body == body, f"body: upstream got {received.body[:300]!r}, expected {body[:300]!r}"
    assert not received.chunked, "the sidecar's client sends Content-Length"
    assert not tracebacks(outcome.logs), f"traceback logged: {tracebacks(outcome.logs)}"

    # Headers that would make an ordinary server read the call differently never reach it.
    for name in received.header_names():
        lowered = name.lower()
        assert lowered not in NEVER_UPSTREAM and not lowered.startswith("x-forwarded-"), f"{name} reached the upstream"
        assert "_" not in name, f"header {name} (an underscore spelling) reached the upstream"
    assert all(v.lower() == "identity" for v in received.header("content-encoding")), "an encoded body reached the upstream"
    for name in absent_headers:
        assert not received.header(name), f"{name} reached the upstream"
    decision_ids = received.header("x-agent-decision")
    assert len(decision_ids) == 1, f"expected one X-Agent-Decision upstream, got {decision_ids}"
    body_sha256 = hashlib.sha256(received.body).hexdigest()

    # 1. the decision event: what the policy judged.
    event = stack.decision_event(decision_ids[0])
    assert event is not None, f"no decision event {decision_ids[0]} in the audit chain"
    assert event.get("outcome") == "allow", event.get("outcome")
    judged = event["input"]["request"]
    assert judged["method"] == received.method, f"judged {judged['method']}, sent {received.method}"
    received_path, received_query = split_target(received.target)
    raw_query = judged.get("raw_query")
    judged_target = judged["path"] + (f"?{raw_query}" if raw_query else "")
    sent_target = received.target if received_query else received_path
    route = event["input"]["tool"]["route"]
    base = BASES.get(route, "")
    # docs/policy.md: request.path is where the call actually goes (the upstream's base path included);
    # a policy view relative to the base path describes the same bytes and is accepted too.
    assert judged_target in (sent_target, sent_target[len(base):] if sent_target.startswith(base) else None), (
        f"judged {judged_target!r} (path + raw_query), the upstream received {received.target!r}")
    if received_query is not None and received_query != "":
        assert raw_query == received_query, f"input.request.raw_query {raw_query!r} != sent query {received_query!r}"
    assert judged["body_sha256"] == body_sha256, "input.request.body_sha256 is not the sha256 of the body sent"
    assert judged.get("body_size", len(received.body)) == len(received.body)
    assert_judged(event, policy)
    # The content headers are part of what was judged: the upstream reads the body under the same label.
    if "content_type" in judged:
        sent_type = received.header("content-type")
        assert sent_type == ([judged["content_type"]] if judged["content_type"] else []), (
            f"judged Content-Type {judged['content_type']!r}, the upstream received {sent_type}")
    # Framing and authority are the sidecar's: one Host (the upstream's), one Content-Length (the body's).
    assert received.header("host") == [stack.upstream_origin.removeprefix("http://")], received.header("host")
    lengths = received.header("content-length")
    assert lengths == [str(len(received.body))] or (not received.body and lengths in ([], ["0"])), lengths

    # 2. the token: what the credential binds, by our verifier and by jwcrypto.
    token = bearer_token(received)
    uri = stack.upstream_origin + received.target
    claims = jwcrypto_claims(token, stack.jwks())
    assert claims.get("decision_id") == decision_ids[0]
    bound = claims.get("req")
    assert isinstance(bound, dict), "token without a req claim"
    assert bound.get("method") == received.method, f"req.method {bound.get('method')!r} != {received.method!r}"
    assert bound.get("uri") == uri, f"req.uri {bound.get('uri')!r} != {uri!r}"
    assert bound.get("body_sha256") == body_sha256, "req.body_sha256 is not the sha256 of the body sent"
    recomputed = hashlib.sha256(f"{received.method.upper()}\n{uri}\n{body_sha256}".encode()).hexdigest()
    assert claims.get("req_hash") == recomputed == request_binding(received.method, uri, body_sha256)
    try:
        check_binding(claims, received.method, uri, received.body)
    except CredentialRejected as rejected:  # pragma: no cover - the message is the point
        raise AssertionError(f"sidecar.verifier refuses the forwarded call: {rejected}") from None
    return received


CANARY = re.compile(rb"canary[a-z0-9]*", re.IGNORECASE)


def canaries_in(data: bytes) -> tuple[bytes, ...]:
    """Marker words (``canary...``) in a request that a refusal must not echo back."""
    return tuple(set(CANARY.findall(data)))
