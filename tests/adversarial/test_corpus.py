"""Hostile requests as data: every line of corpus.jsonl is sent raw to a real sidecar (shipped policy, embedded
OPA) in front of a raw-socket upstream, and must be refused with its code or forwarded as exactly its target.

Corpus format (one JSON object per line; blank lines and lines starting with ``#`` are skipped):

- ``name``: unique; the pytest id.
- ``request``: the bytes the agent sends, as a JSON string (``\\r\\n`` escapes; encoded as UTF-8, so
  ``\\u00e9`` is sent as C3 A9, or as latin-1 with ``"latin1": true``, so ``\\u008b`` is the byte 8B: binary
  bodies such as gzip). Placeholders: ``{task}`` an open task's id, ``{proxy}`` the proxy's host:port,
  ``{cl}`` the byte length of everything after the first blank line (the body), ``{pad:N}`` N letters ``a``,
  ``{repeat:N:TEXT}`` TEXT N times.
- ``task``: open a fresh task first (true/false).
- ``expect``: ``{"refused": "<code>"}`` or ``{"forwarded": {"target": "...", "body": "...", "method": "..."}}``;
  ``target`` is the exact request-target the upstream must receive (the route's base path, see
  adversarial_kit.BASES, then the canonical path and query).
- optional: ``policy`` (values the decision event's input must hold: a plain key is a field of
  ``input.request``, a key starting with ``/`` a JSON pointer into the whole input such as ``/mcp/tool``; checked
  for forwarded calls and for refusals that name a decision), ``absent_headers`` (header names that must not
  reach the upstream), ``mcp`` (true: needs ``protocol: mcp`` on the tools route), ``why`` (a note).

A refusal whose request contains a word starting with ``canary`` must not echo that word back.
"""

from __future__ import annotations

import json
import logging
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from adversarial_kit import (
    Answer,
    Stack,
    assert_forwarded,
    assert_judged,
    assert_refused,
    canaries_in,
    exchange,
    read_answer,
    refusal_code,
    refused_problem,
    send_raw,
)

CORPUS = Path(__file__).with_name("corpus.jsonl")
EXPECT_KEYS = {"refused", "forwarded"}
CASE_KEYS = {"name", "request", "task", "expect", "policy", "absent_headers", "mcp", "why", "latin1"}
PAD = re.compile(r"\{pad:(\d{1,7})\}")
REPEAT = re.compile(r"\{repeat:(\d{1,7}):([^}]{1,16})\}")


@dataclass(frozen=True)
class Case:
    name: str
    request: str
    task: bool
    expect: dict[str, Any]
    policy: dict[str, Any] | None = None
    absent_headers: tuple[str, ...] = ()
    mcp: bool = False
    latin1: bool = False

    def render(self, *, task: str | None, proxy: str) -> bytes:
        text = self.request.replace("{proxy}", proxy)
        if task is not None:
            text = text.replace("{task}", task)
        text = PAD.sub(lambda found: "a" * int(found.group(1)), text)
        text = REPEAT.sub(lambda found: found.group(2) * int(found.group(1)), text)
        data = text.encode("latin-1" if self.latin1 else "utf-8")
        head, separator, body = data.partition(b"\r\n\r\n")
        if b"{cl}" in head:
            head = head.replace(b"{cl}", str(len(body)).encode())
        return head + separator + body


def load_corpus(path: Path = CORPUS) -> list[Case]:
    cases: list[Case] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise AssertionError(f"{path.name}:{number}: not JSON: {exc}") from None
        unknown = set(entry) - CASE_KEYS
        assert not unknown, f"{path.name}:{number}: unknown keys {sorted(unknown)}"
        expect = entry.get("expect")
        assert isinstance(expect, dict) and len(expect) == 1 and set(expect) <= EXPECT_KEYS, (
            f"{path.name}:{number}: expect must be {{refused: code}} or {{forwarded: {{target, body}}}}")
        if "forwarded" in expect:
            forwarded = expect["forwarded"]
            assert isinstance(forwarded, dict) and isinstance(forwarded.get("target"), str) and isinstance(
                forwarded.get("body"), str), f"{path.name}:{number}: forwarded needs target and body"
        else:
            assert isinstance(expect["refused"], str), f"{path.name}:{number}: refused needs a code"
        assert isinstance(entry.get("name"), str) and isinstance(entry.get("request"), str), f"{path.name}:{number}"
        assert isinstance(entry.get("task"), bool), f"{path.name}:{number}: task must be true or false"
        assert "{task}" not in entry["request"] or entry["task"], f"{path.name}:{number}: uses {{task}} without a task"
        cases.append(Case(entry["name"], entry["request"], entry["task"], expect, entry.get("policy"),
                          tuple(entry.get("absent_headers", ())), bool(entry.get("mcp", False)),
                          bool(entry.get("latin1", False))))
    names = [case.name for case in cases]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    assert not duplicates, f"duplicate case names: {duplicates}"
    return cases


CASES = load_corpus()



def test_the_corpus_covers_every_class_of_issue_13() -> None:
    prefixes = {case.name.split("-", 1)[0] for case in CASES}
    assert {"pct", "fragment", "chars", "dots", "absolute", "method", "header", "override", "parser", "dupkey",
            "unlabelled", "form", "encoding", "mcp", "sniff", "prefix", "reqline", "body"} <= prefixes, sorted(prefixes)
    assert len(CASES) >= 200


def test_the_raw_upstream_records_exactly_what_an_ordinary_call_sends(stack: Stack) -> None:
    data = b"GET /crm/customers/42?fields=name HTTP/1.1\r\nHost: x\r\nUser-Agent: raw\r\nConnection: close\r\n\r\n"
    outcome = exchange(stack, data)
    received = assert_forwarded(stack, outcome, target="/api/crm/customers/42?fields=name", body=b"", method="GET")
    assert received.header("user-agent") == ["raw"]
    assert stack.upstream.errors == []


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_corpus(stack: Stack, case: Case) -> None:
    if case.mcp and not stack.mcp_protocol:
        pytest.xfail("waiting for protocol: mcp")
    task = stack.open_task() if case.task else None
    data = case.render(task=task, proxy=stack.proxy_authority)
    outcome = exchange(stack, data)
    expect = case.expect
    if "refused" in expect:
        assert_refused(outcome, code=expect["refused"], mcp_route=case.mcp, canaries=canaries_in(data))
        if case.name.startswith("parser-"):
            lines = [f"{r.name}: {r.getMessage()}" for r in outcome.logs
                     if r.levelno >= logging.INFO and r.name.split(".")[0] in ("sidecar", "aiohttp")]
            assert len(lines) == 1, f"a parser refusal logs one line, not {lines}"
        decision_id = _decision_id(outcome.answer, case.mcp)
        if case.policy is not None:
            assert decision_id, f"{case.name}: policy expectations need a decision: {outcome.describe()}"
            event = stack.decision_event(decision_id)
            assert event is not None, f"no decision event {decision_id}"
            assert_judged(event, case.policy)
    else:
        forwarded = expect["forwarded"]
        assert_forwarded(stack, outcome, target=forwarded["target"], body=forwarded["body"].encode("latin-1" if case.latin1 else "utf-8"),
                         method=forwarded.get("method"), policy=case.policy, absent_headers=case.absent_headers)
    assert stack.upstream.errors == [], f"the sidecar sent the upstream bad HTTP: {stack.upstream.errors}"


def _decision_id(answer: Answer, mcp_route: bool) -> str | None:
    problem = refused_problem(answer, mcp_route=mcp_route)
    value = problem.get("decision_id") if problem else None
    return value if isinstance(value, str) else None


def test_after_the_corpus_the_sidecar_still_serves(stack: Stack) -> None:
    """No hostile case left the listener wedged."""
    answer = send_raw(stack.proxy_port, b"GET /plain/ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.status == 200, answer


def test_pipelined_requests_are_each_judged_on_their_own(stack: Stack) -> None:
    """Smuggling by pipelining: bytes after a request's declared body are the next request, judged alone."""
    data = (b"GET /crm/customers/1 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /crm/notes HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
            b"GET /crm/../payments/transfers HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /crm/customers/2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    stack.upstream.drain()
    before = len(stack.upstream.received)
    with socket.create_connection(("127.0.0.1", stack.proxy_port), timeout=30) as sock:
        sock.sendall(data)
        reader = sock.makefile("rb")
        answers = [read_answer(reader, None) for _ in range(4)]
    assert [a.status for a in answers] == [200, 403, 400, 200], [(a.status, a.body[:200]) for a in answers]
    assert [refusal_code(a, mcp_route=False) for a in answers[1:3]] == ["denied", "bad_request"]
    received = stack.upstream.received[before:]
    assert [r.target for r in received] == ["/api/crm/customers/1", "/api/crm/customers/2"]


def test_docs_security_names_only_cases_that_exist() -> None:
    """docs/security.md cites corpus cases by name or pattern; each citation must match a case."""
    import fnmatch

    doc = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text(encoding="utf-8")
    names = [case.name for case in CASES]
    cited = set(re.findall(r"`([a-z0-9]+-[a-z0-9*-]+)`", doc))
    assert cited, "docs/security.md cites no corpus case"
    missing = sorted(pattern for pattern in cited if not any(fnmatch.fnmatch(name, pattern) for name in names))
    assert not missing, f"docs/security.md cites corpus cases that do not exist: {missing}"
