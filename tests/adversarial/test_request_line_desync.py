"""Where the request-line gate stops reading (sidecar/proxy/request_line.py: trailer fields, a framing line
too long to follow, odd chunk framing) its message is the connection's last. That message may have been
answered already, before its body was read (a refusal from its head alone): nothing read after the stop may
then be served either. Raw sockets against the real sidecar of the adversarial stack."""

from __future__ import annotations

import socket

from adversarial_kit import Answer, Stack, read_answer, refusal_code, tracebacks

from sidecar.proxy.request_line import MAX_FRAMING_LINE

# Refused from its head alone (no route), with its chunked body still coming.
EARLY_REFUSED = b"POST /nowhere HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
# Two spaces before the version: llhttp reads /crm/customers/2, the gate refuses it where it checks it.
UNCHECKED = b"GET /crm/customers/2  HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def after_the_answer(stack: Stack, first: bytes, second: bytes) -> list[Answer]:
    """Send ``first``, read its answer, send ``second``, then read every answer until the connection ends."""
    with socket.create_connection(("127.0.0.1", stack.proxy_port), timeout=30) as sock:
        reader = sock.makefile("rb")
        sock.sendall(first)
        answers = [read_answer(reader, None)]
        try:
            sock.sendall(second)
            while (answer := read_answer(reader, None)).status:
                answers.append(answer)
        except (BrokenPipeError, ConnectionResetError):
            pass
    return answers


def check_nothing_more_served(stack: Stack, rest_of_body: bytes) -> None:
    stack.upstream.drain()
    before, mark = len(stack.upstream.received), stack.logs.mark()
    answers = after_the_answer(stack, EARLY_REFUSED, rest_of_body + UNCHECKED)
    described = [(a.status, a.body[:200]) for a in answers]
    assert [(a.status, refusal_code(a, mcp_route=False)) for a in answers] == [(403, "no_route")], described
    assert stack.upstream.received[before:] == []
    assert tracebacks(stack.logs.since(mark)) == []


def test_after_trailer_fields_of_an_answered_request_nothing_more_is_served(stack: Stack) -> None:
    """The trailer ends the gate's reading: the request after it was never checked, and aiohttp's parser
    would hand it the trailer field as one of its headers."""
    check_nothing_more_served(stack, b"0\r\nX-Smuggled: from-the-trailer\r\n\r\n")


def test_after_a_chunk_line_too_long_to_follow_of_an_answered_request_nothing_more_is_served(stack: Stack) -> None:
    """llhttp reads a chunk extension of any length; the gate stops following at MAX_FRAMING_LINE bytes."""
    check_nothing_more_served(stack, b"5;" + b"a" * MAX_FRAMING_LINE + b"\r\nhello\r\n0\r\n\r\n")
