"""the rate rule counts allowed calls among the 20 latest calls of any outcome.

``recent`` keeps the 20 latest calls by decision time (37c4b93), whatever their outcome, and the shipped
rate rule (anomalies.rego) fires when ``max_calls_in_window`` (19) *allowed* calls are among them inside
the window. A call the policy holds is neither a rate outcome nor a denied outcome: two held calls in
every twenty keep at most 18 allowed calls in ``recent``, so the cap is never reached, however many
allowed calls the task makes inside the window.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from harness import EchoTool, SidecarFactory, open_task
from task_concurrency_support import policy_section, tuned_policy


async def test_held_calls_do_not_push_allowed_calls_out_of_the_rate_window(
        make_sidecar: SidecarFactory, echo_tool: EchoTool, tmp_path: Path) -> None:
    # The shipped rule and cap (19 allowed calls), with an hour-long window so that timing cannot matter.
    rego = tuned_policy(tmp_path, {"rate_window_seconds": 3600})
    sc = await make_sidecar(policy=policy_section(rego))
    task = await open_task(sc.admin, "look up customer 42 and refund a duplicate charge")
    statuses: list[int] = []
    async with httpx.AsyncClient(timeout=30) as agent:
        for _ in range(3):
            for _ in range(18):
                answer = await agent.get(f"{sc.proxy}/crm/customers/42", headers={"X-Agent-Task": task})
                statuses.append(answer.status_code)
            for _ in range(2):  # over the per-call amount: held for approval (outcome "hold")
                answer = await agent.post(f"{sc.proxy}/payments/refunds", json={"amount": 5000},
                                          headers={"X-Agent-Task": task})
                # Held, until the rate rule revokes the task; then the task is gone.
                assert answer.json()["code"] in ("approval_required", "unknown_task"), answer.text
    allowed = [s for s in statuses if s == 200]
    assert statuses[18] == 200 and 403 in statuses  # the 19th allowed call came after two held ones
    # At most 19 allowed calls inside the window; the 20th is denied (task_request_rate) and the task revoked.
    assert len(allowed) <= 19, f"{len(allowed)} allowed calls inside one rate window (cap 19)"
    assert len(echo_tool.seen) <= 19
