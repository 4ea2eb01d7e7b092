"""Pending approvals under a hostile agent: identical calls at once, hang-ups while filing, expired queue entries.

A prompt-injected agent controls its bytes, its timing, its parallelism and its hang-ups. Real sidecars, real
sockets, the embedded engine, SQLite and a real redis-server shared by two sidecars; races are made certain by
barriers and gates, never by sleeps.

- Identical held calls sent at once, while the task still has room, get one approval between them: the store
  looks for the call's pending approval in the same atomic step that counts and files (asking the humans N times
  for one call would let it run once per approval, and take N places of the task's quota).
- An agent hanging up while its approval is filed does not cut the filing from its announcement: the approval
  the store commits is in the audit log (approval.requested), sent to the webhook, and the held call is in its
  task's history.
- Redis: filing prunes the fleet-wide pending queue of expired ids, as it prunes the per-task and per-agent sets.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from approvals_support import APPROVAL_POLICY, ApproverIdP, audit_events, eventually, list_pending, open_task
from harness import SidecarFactory
from pending_cap_support import CAP, LookupsAtAGate, codes, post_note, replicas

ALICE = "alice@example.com"


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_identical_held_calls_sent_at_once_with_room_left_ask_the_humans_once(
        backend: str, make_sidecar: SidecarFactory, tmp_path: Path, idp: ApproverIdP,
        request: pytest.FixtureRequest) -> None:
    """Not only for the last place: one call, one approval, one place of the quota, however many copies race."""
    sidecars = await replicas(backend, make_sidecar, tmp_path, idp, request)
    task = await open_task(sidecars[0].admin, "write notes on customer 42")
    same = CAP
    arrived: list[int] = []
    everyone = asyncio.Event()
    for sc in sidecars:
        path = sc.sidecar.path
        path.approvals = LookupsAtAGate(path.approvals, arrived, everyone, same)
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=same)) as agent:
        answers = list(await asyncio.gather(*(
            post_note(agent, sidecars[n % len(sidecars)].proxy, task, "the one note") for n in range(same))))
        assert codes(answers) == ["approval_required"] * same, [a.text for a in answers]
        pending = await list_pending(sidecars[0].admin, idp.token(ALICE, ["approvers"]))
        assert len({a.json()["approval_id"] for a in answers}) == 1 and len(pending) == 1, (
            f"{same} identical calls sent at once filed {len(pending)} approvals")
        # The task's other places are still free for other calls.
        others = [await post_note(agent, sidecars[0].proxy, task, f"another note {n}") for n in range(CAP - 1)]
    assert codes(others) == ["approval_required"] * (CAP - 1), [a.text for a in others]
    audit_paths = {sc.audit_path for sc in sidecars}

    async def requested() -> list[dict[str, Any]] | None:
        found = [e for path in audit_paths for e in audit_events(path) if e.get("type") == "approval.requested"]
        return found if len(found) >= CAP else None

    # The one note, then the others: each asked once.
    assert len(await eventually(requested, what="the approvals requested")) == CAP


@pytest.mark.parametrize("prefer", [None, "wait=30"])
async def test_an_agent_hanging_up_while_its_approval_is_filed_leaves_no_unannounced_approval(
        prefer: str | None, make_sidecar: SidecarFactory, idp: ApproverIdP) -> None:
    """The store commits the approval on its own thread after the handler is cancelled: the approval is filed, so it
    is announced (approval.requested), the held call audited and in its task's history, as when the agent stays."""
    sc = await make_sidecar(policy_dir=APPROVAL_POLICY, approvals=idp.config(max_pending_per_task=CAP))
    task = await open_task(sc.admin, "write notes on customer 42")
    path = sc.sidecar.path
    store: Any = path.approvals  # the SQLite store: its thread-side step is gated
    entered, release = threading.Event(), threading.Event()
    real_create = store._create

    def create_after_the_hang_up(approval: Any, limits: Any) -> Any:  # on the store's thread
        entered.set()
        release.wait(30)
        return real_create(approval, limits)

    store._create = create_after_the_hang_up
    try:
        async with httpx.AsyncClient(timeout=60) as agent:
            call = asyncio.create_task(post_note(agent, sc.proxy, task, "a note", **({"Prefer": prefer} if prefer else {})))
            await eventually(lambda: _true(entered.is_set()), what="the approval being filed")
            call.cancel()  # the agent hangs up
            with pytest.raises(asyncio.CancelledError):
                await call
        await eventually(lambda: _true(path.in_flight == 0), what="the handler cancelled")
        # The filing still needs the call: it stays charged (admission control, the body budget) until it ends.
        assert path.orphaned == 1 and path.interceptor.bodies.used > 0
    finally:
        release.set()
        store._create = real_create
    [approval] = await eventually(lambda: list_pending(sc.admin, idp.token(ALICE, ["approvers"])),
                                  what="the approval committed after the hang-up")
    await eventually(lambda: _true(not path.finishing), what="the filing finished")
    # Its body stayed charged while the filing needed it, and is given back now.
    assert path.orphaned == 0 and path.interceptor.bodies.used == 0
    async with httpx.AsyncClient(timeout=60) as agent:
        retry = await post_note(agent, sc.proxy, task, "a note")
    assert retry.json()["approval_id"] == approval["id"], retry.text
    retry_decision = retry.json()["decision_id"]
    await eventually(lambda: _true(any(e.get("decision_id") == retry_decision for e in audit_events(sc.audit_path))),
                     what="the retry's decision in the audit log")
    events = audit_events(sc.audit_path)
    requested = [e for e in events if e.get("type") == "approval.requested"]
    assert [e["approval_id"] for e in requested] == [approval["id"]], (
        "a pending approval the humans can see and approve was never audited as requested")
    held = [e for e in events if e.get("type") == "decision" and e.get("outcome") == "hold"]
    assert [e["approval_id"] for e in held] == [approval["id"]] * 2  # the call that hung up, and its retry
    assert held[0]["decision_id"] == requested[0]["decision_id"] != retry_decision
    assert await task_outcomes(sc.admin, task) == ["hold", "hold"]


async def test_an_agent_hanging_up_while_it_waits_for_its_approval_leaves_the_held_call_in_its_task_history(
        make_sidecar: SidecarFactory, idp: ApproverIdP) -> None:
    """Prefer: wait, then the agent hangs up before a human decides: the call was held and not forwarded, and the
    policy's view of the task (rate rules, the call cap) must see it, as it sees the same call without the wait."""
    sc = await make_sidecar(policy_dir=APPROVAL_POLICY, approvals=idp.config(max_pending_per_task=CAP))
    task = await open_task(sc.admin, "write notes on customer 42")
    path = sc.sidecar.path
    async with httpx.AsyncClient(timeout=60) as agent:
        call = asyncio.create_task(post_note(agent, sc.proxy, task, "a note", Prefer="wait=30"))
        await eventually(lambda: list_pending(sc.admin, idp.token(ALICE, ["approvers"])), what="the call waiting")
        call.cancel()  # the agent hangs up
        with pytest.raises(asyncio.CancelledError):
            await call
    await eventually(lambda: _true(path.in_flight == 0), what="the handler cancelled")
    await eventually(lambda: _true(not path.finishing), what="what the hang-up left to do")
    assert path.orphaned == 0 and path.interceptor.bodies.used == 0
    assert await task_outcomes(sc.admin, task) == ["hold"]


async def task_outcomes(admin: str, task: str) -> list[str]:
    async with httpx.AsyncClient() as client:
        history = (await client.get(f"{admin}/v1/tasks/{task}")).json()["history"]
    return [record["outcome"] for record in history["recent"]]


async def _true(value: bool) -> bool:
    return value


async def test_filing_prunes_the_fleet_wide_pending_queue_in_redis(redis_server: Any) -> None:
    """Approvals expire unseen all the time (nobody opened the approver page): their ids must not pile up."""
    import redis.asyncio as aioredis

    from sidecar.approvals.redis_store import RedisApprovalStore
    from sidecar.approvals.store import Approval, PendingLimits, RequestBinding

    store = RedisApprovalStore(redis_server.url)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        now = time.time()
        for n in range(50):
            binding = RequestBinding("POST", f"http://crm.internal/notes/{n}", f"{n:064x}", "agent", f"t-{n}", "crm")
            await store.create(Approval(id=f"ap-{n}", binding=binding, decision_id=f"d-{n}", route="crm", reasons=[],
                                        risk="high", approvers_required=1, group=None, created_at=now - 2,
                                        expires_at=now - 1), PendingLimits(per_task=1, per_agent=1))
        queued = await client.zcard("agent-sidecar:approvals:pending")
        assert queued <= 1, f"{queued} expired approvals still in the fleet-wide pending queue"
    finally:
        await client.aclose()
        await store.close()


# ---------------------------------------------------------------- the stores themselves

STORE_AGENT = "spiffe://test/ns/agents/sa/agent"


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def two_clients(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """Two clients of one store (with SQLite and Redis, two replicas' view of the same data)."""
    from sidecar.approvals.sqlite_store import SqliteApprovalStore
    from sidecar.approvals.store import MemoryApprovalStore

    if request.param == "memory":
        shared = MemoryApprovalStore()
        opened: list[Any] = [shared, shared]
    elif request.param == "sqlite":
        opened = [SqliteApprovalStore(tmp_path / "approvals.db") for _ in range(2)]
    else:
        from sidecar.approvals.redis_store import RedisApprovalStore

        url = request.getfixturevalue("redis_server").url
        opened = [RedisApprovalStore(url) for _ in range(2)]
    yield opened
    for store in {id(s): s for s in opened}.values():
        await store.close()


def one_call(approval_id: str, *, risk: str = "high", rules: tuple[str, ...] = ("writes",), group: str | None = None,
             approvers: int = 1, expires_in: float = 600, target: str = "http://crm.internal/notes") -> Any:
    """A held call's approval; the same arguments but the id are the same call asking the same."""
    from sidecar.approvals.store import Approval, RequestBinding

    now = time.time()
    binding = RequestBinding("POST", target, "ab" * 32, STORE_AGENT, "t-1", "crm")
    return Approval(id=approval_id, binding=binding, decision_id=f"d-{approval_id}", route="crm", reasons=["why"],
                    risk=risk, approvers_required=approvers, group=group, created_at=now, expires_at=now + expires_in,
                    rules=list(rules))


async def test_the_store_files_one_approval_per_call_and_gives_it_to_the_copies_sent_at_once(two_clients: Any) -> None:
    from sidecar.approvals.store import PendingLimits

    limits = PendingLimits(per_task=3, per_agent=3)
    filed = await asyncio.gather(*(two_clients[n % 2].create(one_call(f"ap-{n}"), limits) for n in range(12)))
    assert len({a.id for a in filed}) == 1
    assert await two_clients[0].count_pending() == 1
    # At the cap too: the call's own approval is no new place.
    others = [await two_clients[0].create(one_call(f"other-{n}", target=f"http://crm.internal/other/{n}"), limits)
              for n in range(2)]
    again = await two_clients[1].create(one_call("ap-again"), limits)
    assert again.id == filed[0].id and again.status == "pending"
    assert [o.id for o in others] == ["other-0", "other-1"]


async def test_the_store_asks_again_when_the_call_asks_otherwise_or_its_approval_no_longer_waits(
        two_clients: Any) -> None:
    from sidecar.approvals.store import Verdict

    first, other = two_clients
    assert (await first.create(one_call("ap-1"))).id == "ap-1"
    assert (await other.create(one_call("ap-1b", rules=("writes", "writes")))).id == "ap-1"  # the rules, as a set
    # Held otherwise now: the humans must see what they approve.
    assert (await other.create(one_call("ap-2", risk="critical"))).id == "ap-2"
    assert (await first.create(one_call("ap-3", risk="critical", rules=("writes", "exfiltration_chain")))).id == "ap-3"
    assert (await other.create(one_call("ap-4", risk="critical", rules=("writes", "exfiltration_chain"),
                                        group="finance"))).id == "ap-4"
    assert (await first.create(one_call("ap-5", risk="critical", rules=("writes", "exfiltration_chain"),
                                        group="finance", approvers=2))).id == "ap-5"
    same_as_5 = one_call("ap-5b", risk="critical", rules=("exfiltration_chain", "writes"), group="finance", approvers=2)
    assert (await other.create(same_as_5)).id == "ap-5"
    # Decided: a new one.
    await first.decide("ap-5", Verdict(approver="alice", groups=("finance",), approve=False))
    assert (await other.create(same_as_5)).id == "ap-5b"
    # Expired: a new one.
    assert (await first.create(one_call("ap-6", target="http://crm.internal/short", expires_in=-1))).id == "ap-6"
    assert (await other.create(one_call("ap-7", target="http://crm.internal/short"))).id == "ap-7"
