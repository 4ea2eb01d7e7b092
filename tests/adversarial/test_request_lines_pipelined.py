"""Request lines on kept-alive connections: each is checked where its head starts, never in a body, and a bad
one is refused in its place among pipelined requests (sidecar/proxy/request_line.py). Raw sockets against
the real sidecar of the adversarial stack; the corpus covers each malformed line on a connection of its own."""

from __future__ import annotations

import json
import logging
import socket

from adversarial_kit import Answer, Stack, read_answer, refusal_code, tracebacks

BAD_LINE = b"GET /crm/customers/2  HTTP/1.1"  # two spaces before the version: llhttp read /crm/customers/2


def converse(stack: Stack, *writes: bytes, answers_between: int = 0) -> list[Answer]:
    """Send ``writes`` on one connection, reading ``answers_between`` answers after each write but the last,
    then every answer until the sidecar closes the connection (a reset: it closed with the last write unread)."""
    answers: list[Answer] = []
    with socket.create_connection(("127.0.0.1", stack.proxy_port), timeout=30) as sock:
        reader = sock.makefile("rb")
        try:
            for number, data in enumerate(writes):
                sock.sendall(data)
                if number < len(writes) - 1:
                    answers += [read_answer(reader, None) for _ in range(answers_between)]
            while (answer := read_answer(reader, None)).status:
                answers.append(answer)
        except (BrokenPipeError, ConnectionResetError):
            pass
    return answers


def statuses(answers: list[Answer]) -> list[tuple[int, str | None]]:
    return [(a.status, refusal_code(a, mcp_route=False) if a.status >= 400 else None) for a in answers]


def received_since(stack: Stack, before: int) -> list[tuple[str, bytes]]:
    return [(r.target, r.body) for r in stack.upstream.received[before:]]


def test_a_bad_request_line_after_a_good_request_is_refused_in_its_place(stack: Stack) -> None:
    stack.upstream.drain()
    before, mark = len(stack.upstream.received), stack.logs.mark()
    answers = converse(stack, b"GET /crm/customers/1 HTTP/1.1\r\nHost: x\r\n\r\n"
                              + BAD_LINE + b"\r\nHost: x\r\nX-Canary: canarypipelined\r\n\r\n"
                              + b"GET /crm/customers/3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert statuses(answers) == [(200, None), (400, "bad_request")], [(a.status, a.body[:200]) for a in answers]
    assert b"canarypipelined" not in answers[1].body
    assert received_since(stack, before) == [("/api/crm/customers/1", b"")]
    logs = stack.logs.since(mark)
    assert tracebacks(logs) == []
    refused = [r.getMessage() for r in logs if r.levelno >= logging.INFO and "refused" in r.getMessage()]
    assert len(refused) == 1, refused


def test_bodies_that_look_like_request_lines_are_bodies(stack: Stack) -> None:
    """A Content-Length body and a chunked body (extensions, a look-alike split over two chunks) full of
    request-line look-alikes are forwarded as they are; the head after them is still checked."""
    task = stack.open_task()
    look_alike = b"GET /crm/  HTTP/1.1\r\nHost: x\r\n\r\n \tGET\t/payments/transfers HTTP/1.1\r\n"
    length_body = b"POST /crm/notes HTTP/1.1\r\nHost: x\r\nX-Agent-Task: " + task.encode() + (
        b"\r\nContent-Type: text/plain\r\nContent-Length: " + str(len(look_alike)).encode() + b"\r\n\r\n" + look_alike)
    chunked_body = b"POST /crm/notes HTTP/1.1\r\nHost: x\r\nX-Agent-Task: " + task.encode() + (
        b"\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"10;note=\"a b\"\r\n" + look_alike[:16] + b"\r\n"
        + hex(len(look_alike) - 16)[2:].encode() + b"\r\n" + look_alike[16:] + b"\r\n"
        b"0;note=\"GET /crm/  HTTP/1.1\"\r\n\r\n")
    stack.upstream.drain()
    before = len(stack.upstream.received)
    answers = converse(stack, length_body + b"\r\n" + chunked_body + BAD_LINE + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert statuses(answers) == [(200, None), (200, None), (400, "bad_request")], [(a.status, a.body[:200]) for a in answers]
    assert received_since(stack, before) == [("/api/crm/notes", look_alike), ("/api/crm/notes", look_alike)]


def test_a_request_line_split_across_two_writes_is_checked_whole(stack: Stack) -> None:
    """The second request line is cut where its two spaces meet: the sidecar has read the first write
    (it answered the request before the cut) when the second arrives."""
    first = b"GET /crm/customers/1 HTTP/1.1\r\nHost: x\r\n\r\nGET /crm/customers/2 "
    stack.upstream.drain()
    before = len(stack.upstream.received)
    good = converse(stack, first, b"HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", answers_between=1)
    bad = converse(stack, first, b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", answers_between=1)
    assert statuses(good) == [(200, None), (200, None)], [(a.status, a.body[:200]) for a in good]
    assert statuses(bad) == [(200, None), (400, "bad_request")], [(a.status, a.body[:200]) for a in bad]
    assert [target for target, _ in received_since(stack, before)] == [
        "/api/crm/customers/1", "/api/crm/customers/2", "/api/crm/customers/1"]


def test_after_an_upgrade_request_the_connection_serves_nothing_more(stack: Stack) -> None:
    """What follows an Upgrade may not be HTTP: it is not read as requests. aiohttp itself would go on
    parsing a later write after declining an h2c upgrade, so the connection ends with that answer."""
    stack.upstream.drain()
    before = len(stack.upstream.received)
    upgrade = b"GET /crm/customers/1 HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
    answers = converse(stack, upgrade, BAD_LINE + b"\r\nHost: x\r\nConnection: close\r\n\r\n", answers_between=1)
    assert statuses(answers) == [(200, None)], [(a.status, a.body[:200]) for a in answers]
    assert received_since(stack, before) == [("/api/crm/customers/1", b"")]


def test_a_trailer_field_never_reaches_the_next_request(stack: Stack) -> None:
    """aiohttp's parser hands the last trailer field of a chunked body to the next pipelined request as one of
    its headers: that request would be judged and sent with a header its own bytes do not hold. After trailer
    fields the connection serves nothing more."""
    task = stack.open_task()
    stack.upstream.drain()
    before = len(stack.upstream.received)
    answers = converse(stack, b"POST /crm/notes HTTP/1.1\r\nHost: x\r\nX-Agent-Task: " + task.encode()
                       + b"\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
                       + b"3\r\nabc\r\n0\r\nX-Smuggled: from-the-trailer\r\n\r\n"
                       + b"GET /crm/customers/7 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert statuses(answers) == [(200, None)], [(a.status, a.body[:200]) for a in answers]
    received = stack.upstream.received[before:]
    assert [(r.target, r.body) for r in received] == [("/api/crm/notes", b"abc")]
    assert not any(name.lower() == b"x-smuggled" for r in received for name, _ in r.headers)


def test_the_refusal_is_a_problem_document(stack: Stack) -> None:
    answers = converse(stack, BAD_LINE + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert len(answers) == 1 and answers[0].media_type == "application/problem+json"
    problem = json.loads(answers[0].body)
    assert problem["code"] == "bad_request" and problem["status"] == 400 and "request line" in problem["detail"]
