"""The raw upstream's misbehaviour switches, through a real sidecar: a reset before the answer, a held answer."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from adversarial_kit import Stack, assert_refused, exchange, send_raw

GET = b"GET /crm/customers/42 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"



def test_an_upstream_reset_is_a_clean_upstream_error(stack: Stack) -> None:
    stack.upstream.reset_before_answer = True
    try:
        outcome = exchange(stack, GET)
    finally:
        stack.upstream.reset_before_answer = False
    assert [r.target for r in outcome.forwarded] == ["/api/crm/customers/42"]  # it did leave, then the tool reset
    outcome.forwarded = []  # what matters now is how the agent is answered
    assert_refused(outcome, code="upstream_error")
    assert outcome.answer.status == 502


def test_a_held_upstream_answers_when_released(stack: Stack) -> None:
    hold = asyncio.Event()
    stack.upstream.hold = hold
    stack.upstream.drain()
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(send_raw, stack.proxy_port, GET)
            arrived = stack.run(stack.upstream.next_request())  # the upstream has the request and is holding it
            assert arrived.target == "/api/crm/customers/42"
            assert not pending.done()
            stack.loop.call_soon_threadsafe(hold.set)
            answer = pending.result(30)
    finally:
        stack.upstream.hold = None
    assert answer.status == 200
