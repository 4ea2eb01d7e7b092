"""Issue 15, item 3: a runaway evaluation stays one call's problem.

A real sidecar on the embedded engine (one worker, one spare engine), a policy with one path that
evaluates for seconds, and normal calls sent while that evaluation is still running.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness import RunningSidecar

SLOW_POLICY = Path(__file__).resolve().parent / "policies" / "slow"


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not exposed")


async def scrape(client: httpx.AsyncClient, sidecar: RunningSidecar) -> str:
    response = await client.get(f"{sidecar.metrics}/metrics")
    return response.text


async def test_normal_calls_are_decided_while_a_runaway_evaluation_overruns(make_sidecar: Any, echo_tool: Any) -> None:
    sc: RunningSidecar = await make_sidecar(policy={"engine": "embedded", "rego_dir": str(SLOW_POLICY), "timeout_ms": 250,
                                                    "embedded_workers": 1, "embedded_spare_engines": 1})
    async with httpx.AsyncClient(timeout=30) as agent:
        slow = await agent.get(f"{sc.proxy}/crm/runaway")
        during = await scrape(agent, sc)
        sequential = [await agent.get(f"{sc.proxy}/crm/customers/{n}") for n in range(5)]
        concurrent = await asyncio.gather(*(agent.get(f"{sc.proxy}/crm/orders/{n}") for n in range(5)))
        after = await scrape(agent, sc)
    assert slow.status_code == 503
    assert slow.json()["code"] == "policy_unavailable" and slow.json()["policy_error"] == "timeout"
    assert [r.status_code for r in [*sequential, *concurrent]] == [200] * 10
    # The runaway evaluation was still running while every normal call was decided: a spare stood in.
    assert metric(during, "agent_sidecar_policy_spare_engines") == 1
    assert metric(after, "agent_sidecar_policy_spare_engines") == 1
    assert metric(after, "agent_sidecar_policy_overruns_total") == 1
    assert "/crm/runaway" not in [seen.path for seen in echo_tool.seen]


async def test_calls_sent_alongside_the_runaway_one_are_decided_within_their_own_deadlines(
        make_sidecar: Any, echo_tool: Any) -> None:
    """Normal traffic from the moment the runaway call is sent: the runaway evaluation hands its slot to
    the spare engine long before its own deadline, so calls queued behind it are not refused either.

    A 1 s deadline rather than 250 ms: on a test machine busy with other suites a call's own sub-millisecond
    evaluation can be descheduled past 250 ms, which would measure the machine, not the engine."""
    sc: RunningSidecar = await make_sidecar(policy={"engine": "embedded", "rego_dir": str(SLOW_POLICY), "timeout_ms": 1000,
                                                    "embedded_workers": 1, "embedded_spare_engines": 1})
    async with httpx.AsyncClient(timeout=30) as agent:
        slow = asyncio.create_task(agent.get(f"{sc.proxy}/crm/runaway"))
        normal: list[httpx.Response] = []
        while not slow.done() or len(normal) < 10:
            normal.append(await agent.get(f"{sc.proxy}/crm/customers/{len(normal)}"))
        text = await scrape(agent, sc)
    assert (await slow).json()["code"] == "policy_unavailable"
    assert [r.status_code for r in normal] == [200] * len(normal), [r.text for r in normal if r.status_code != 200]
    assert metric(text, "agent_sidecar_policy_overruns_total") == 1


async def test_the_overrunning_engine_returns_to_the_pool_when_it_finishes(make_sidecar: Any) -> None:
    """A 1 s deadline (see above) and the ~1 s /overrun path, which still outlasts it on an idle machine."""
    sc: RunningSidecar = await make_sidecar(policy={"engine": "embedded", "rego_dir": str(SLOW_POLICY), "timeout_ms": 1000,
                                                    "embedded_spare_engines": 1})
    async with httpx.AsyncClient(timeout=30) as agent:
        slow = await agent.get(f"{sc.proxy}/crm/overrun")
        deadline = asyncio.get_running_loop().time() + 120
        while metric(await scrape(agent, sc), "agent_sidecar_policy_spare_engines") != 0:
            assert asyncio.get_running_loop().time() < deadline, "the overrunning engine never came back"
            await asyncio.sleep(0.1)
        # Both engines are free again: a second runaway is covered by the spare just like the first.
        second = await agent.get(f"{sc.proxy}/crm/overrun")
        normal = await agent.get(f"{sc.proxy}/crm/customers/1")
        text = await scrape(agent, sc)
    assert slow.status_code == second.status_code == 503
    assert normal.status_code == 200
    assert metric(text, "agent_sidecar_policy_overruns_total") == 2


async def test_without_a_spare_an_overrun_costs_its_slot_and_callers_are_refused_not_forwarded(
        make_sidecar: Any, echo_tool: Any) -> None:
    sc: RunningSidecar = await make_sidecar(policy={"engine": "embedded", "rego_dir": str(SLOW_POLICY), "timeout_ms": 250,
                                                    "embedded_spare_engines": 0})
    async with httpx.AsyncClient(timeout=30) as agent:
        await agent.get(f"{sc.proxy}/crm/runaway")
        blocked = await agent.get(f"{sc.proxy}/crm/customers/1")
    assert blocked.status_code == 503 and blocked.json()["code"] in {"policy_unavailable", "overloaded"}
    assert echo_tool.seen == []


# An evaluation that raises what no binding should: a stand-in (monkeypatched _evaluate_on), as no policy can make
# the binding raise these. The pool's bookkeeping must survive it and the caller must get a PolicyError.

def _raise_once(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    import sidecar.policy.embedded as embedded

    real = embedded._evaluate_on
    raised: list[bool] = []

    def evaluate_on(engine: Any, path: str, document: dict[str, Any]) -> Any:
        if not raised:
            raised.append(True)
            raise exc
        return real(engine, path, document)

    monkeypatch.setattr(embedded, "_evaluate_on", evaluate_on)


@pytest.mark.parametrize("exc", [StopIteration("x"), SystemExit(3), KeyboardInterrupt(), GeneratorExit()], ids=type)
async def test_an_evaluation_that_raises_anything_answers_its_caller_and_keeps_the_pool_whole(
        monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    from harness import FIXTURE_POLICY
    from sidecar.policy.embedded import EmbeddedEngine
    from sidecar.policy.engine import PolicyError

    engine = EmbeddedEngine(FIXTURE_POLICY, workers=1, spare_engines=0)
    request = {"request": {"method": "GET", "path": "/x"}}
    try:
        _raise_once(monkeypatch, exc)
        try:
            async with asyncio.timeout(5):
                await engine.evaluate("sidecar/authz/decision", request)
        except BaseException as raised:  # noqa: BLE001 - a SystemExit let through would stop the test run's loop
            caught: BaseException | None = raised
        else:
            caught = None
        assert isinstance(caught, PolicyError), f"the caller got {caught!r}"
        async with asyncio.timeout(5):  # the one slot is back: the next call is decided
            await engine.evaluate("sidecar/authz/decision", request)
    finally:
        engine.close_now()
