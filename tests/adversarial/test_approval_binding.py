"""An approval is bound to the canonical request: another spelling of the same call uses it, any other call does not.

A held call's approval must only release exactly the call it was made for (SPEC, Human approval). With one
canonical request, a retry spelled differently but canonically equal (``r%65funds``) is the same call, while a
retry that differs in its target, its body bytes or its method, or that is ambiguous, is refused and leaves the
approval unused.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from adversarial_kit import Stack, assert_forwarded, assert_refused, exchange, jwcrypto_claims, refused_problem

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from approvals_support import ApproverIdP, approve  # noqa: E402

BODY = b'{"amount":100}'  # over the per-call limit, under the critical amount: one approver


def post(target: str, task: str, body: bytes = BODY, approval: str | None = None, extra: str = "") -> bytes:
    head = (f"POST {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Agent-Task: {task}\r\n"
            + (f"X-Agent-Approval: {approval}\r\n" if approval else "") + extra
            + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> ApproverIdP:
    return ApproverIdP(tmp_path_factory.mktemp("approvers"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, idp: ApproverIdP) -> Iterator[Stack]:
    running = Stack(tmp_path_factory.mktemp("adversarial-approvals"), approvals=idp.config()).start()
    yield running
    running.stop()


def test_an_approval_releases_only_the_canonical_call_it_was_made_for(stack: Stack, idp: ApproverIdP) -> None:
    task = stack.open_task()
    held = exchange(stack, post("/crm/r%65funds", task))
    assert_refused(held, code="approval_required")
    problem = refused_problem(held.answer, mcp_route=False)
    assert problem is not None
    approval_id = problem["approval_id"]
    token = idp.token("alice@example.com", ["approvers"])
    answer = stack.run(approve(stack.sidecar.admin, approval_id, token))
    assert answer.status_code == 200, answer.text

    refusals = {
        "approval_wrong_target": post("/crm/refunds?x=1", task, approval=approval_id),
        "approval_wrong_body": post("/crm/refunds", task, body=b'{"amount": 100}', approval=approval_id),
        "bad_request": post("/crm/refunds#x", task, approval=approval_id),
        "method_override": post("/crm/refunds", task, approval=approval_id, extra="X-HTTP-Method-Override: DELETE\r\n"),
    }
    for code, data in refusals.items():
        assert_refused(exchange(stack, data), code=code)
    duplicate = post("/crm/refunds", task, body=b'{"amount":100,"amount":1}', approval=approval_id)
    assert_refused(exchange(stack, duplicate), code="bad_request")

    # The same call spelled as it was held: the canonical request is the one approved.
    released = exchange(stack, post("/crm/r%65funds", task, approval=approval_id))
    received = assert_forwarded(stack, released, target="/api/crm/refunds", body=BODY, method="POST")
    claims = jwcrypto_claims(received.header("authorization")[0].removeprefix("Bearer "), stack.jwks())
    assert claims.get("approval_id") == approval_id

    assert_refused(exchange(stack, post("/crm/refunds", task, approval=approval_id)), code="approval_used")
