"""The request path, in order: intercept, context, decide, enforce, mint, forward, record.

Each step is a module with a narrow interface; this file only sequences them
and turns every refusal into one answer and one audit event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeVar

from aiohttp import web

from .approvals import Approval, ApprovalStore, RequestBinding
from .approvals.desk import HoldSettings
from .approvals.preview import PreviewSettings
from .approvals.store import new_approval_id
from .audit import AuditError, AuditSink
from .audit.evidence import write_after, write_first
from .audit.writer import Receipt as AuditReceipt
from .context import AgentIdentity, build_input
from .delegation import DelegationVerifier
from .credentials import CredentialMinter
from .documents import Decision, InterceptedCall, MintedCredential
from .ids import random_uuid
from .jsoncodec import JsonDocument
from .observability.metrics import Metrics
from .policy import Decider
from .problems import Refusal
from .proxy import mcp, mcp_refusal
from .proxy.forward import Forwarder
from .proxy.intercept import Interceptor
from .proxy.mcp_catalog import ResponseTap, ToolCatalog, policy_hints
from .proxy.tunnel import intercept_tunnel, run_tunnel
from .tasks import CallRecord, TaskStore
from .tasks.backlog import PendingWrite, RecordBacklog
from .tasks.measures import destination_external, effective_measures, payload, summed_measures, summed_measures_of
from .tasks.store import Reservation, iso, iso_ms
from .tasks.turns import TaskTurns

log = logging.getLogger("sidecar.pipeline")

# RequestBinding field that differs -> its refusal code.
MISMATCH_CODES = {"method": "approval_wrong_method", "target": "approval_wrong_target",
                  "body_sha256": "approval_wrong_body", "agent": "approval_wrong_agent", "task_id": "approval_wrong_task",
                  "route": "approval_wrong_route"}

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

# Decide-and-reserve attempts for one call when other replicas keep changing its task's history.
DECISION_ATTEMPTS = 8
# A reservation outlives its route's upstream timeout by this much (connecting, recording), then expires.
RESERVATION_MARGIN_SECONDS = 10.0
# What follows the upstream's answer (audit, metrics, the task history) gets this long before it is queued.
RECORD_DEADLINE_SECONDS = 5.0

T = TypeVar("T")


class IdentitySource(Protocol):
    def current(self) -> AgentIdentity:
        """The agent's workload identity; raise Refusal when it cannot be trusted."""
        ...


class StaticIdentity:
    def __init__(self, identity: str) -> None:
        self._identity = AgentIdentity(identity, verified=False)

    def current(self) -> AgentIdentity:
        return self._identity


@dataclass
class Trace:
    """What one call gathered on its way through the path, for the record step."""

    started: float = field(default_factory=time.perf_counter)
    call: InterceptedCall | None = None
    agent: AgentIdentity | None = None
    task: dict[str, Any] | None = None
    decisions: list[tuple[Decision, dict[str, Any]]] = field(default_factory=list)
    delegation: list[dict[str, Any]] = field(default_factory=list)
    approval_id: str | None = None
    reservation: Reservation | None = None  # held by the handler until forwarding takes it over
    remembered: bool = False  # a held or denied call already in its task's history
    orphaned: bool = False  # the agent left while its call was forwarded: the forwarding ends it


@dataclass
class RequestPath:
    interceptor: Interceptor
    identity: IdentitySource
    tasks: TaskStore
    decider: Decider
    approvals: ApprovalStore
    minters: dict[str, CredentialMinter]  # by route name
    forwarder: Forwarder
    audit: AuditSink
    metrics: Metrics
    audit_fail_closed: bool = True
    delegation: DelegationVerifier = field(default_factory=lambda: DelegationVerifier(None))
    hold: HoldSettings = field(default_factory=HoldSettings)
    max_in_flight: int = 4096
    in_flight: int = 0
    orphaned: int = 0  # calls still forwarded and recorded for an agent that hung up: they count in flight too
    tool_catalog: ToolCatalog = field(default_factory=ToolCatalog)
    turns: TaskTurns = field(default_factory=TaskTurns)
    backlog: RecordBacklog = field(default_factory=RecordBacklog)
    finishing: set[asyncio.Task[Any]] = field(default_factory=set)  # after-call work no hang-up can cancel

    def __post_init__(self) -> None:
        self.backlog.on_size = self.metrics.record_backlog.set
        self.backlog.on_dropped = self._record_dropped
        self.backlog.on_written = self._record_recovered

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        trace = Trace()
        if self.in_flight + self.orphaned >= self.max_in_flight:
            # Admission control keeps memory bounded under a flood: refused at once, never queued.
            return await self._refuse(trace, Refusal("overloaded", f"{self.in_flight + self.orphaned} calls in flight (limit {self.max_in_flight})",
                                                     headers={"Retry-After": "1"}))
        self.in_flight += 1
        try:
            return await self._serve(request, trace)
        except Refusal as refusal:
            self._release_reservation(trace, refusal.code)
            return await self._refuse(trace, refusal)
        except asyncio.CancelledError:
            self._release_reservation(trace, "agent_disconnected")
            raise
        except Exception as exc:  # noqa: BLE001 - fail closed on anything unforeseen
            log.exception("unhandled error on the request path")
            self._release_reservation(trace, "internal_error")
            return await self._refuse(trace, Refusal("internal_error", f"internal error ({type(exc).__name__})"))
        finally:
            self.in_flight -= 1
            if trace.call is not None and not trace.orphaned:
                self.interceptor.release(trace.call)

    async def _serve(self, request: web.BaseRequest, trace: Trace) -> web.StreamResponse:
        if request.method == "CONNECT":
            return await self._serve_tunnel(request, trace)
        call = trace.call = await self.interceptor.intercept(request)  # 1. intercept
        agent = trace.agent = self.identity.current()  # 2. context
        trace.delegation = await self.delegation.chain(call.delegation.reveal() if call.delegation else None)
        approval = await (self._presented_approval(call, agent) if call.approval_id else self._standing_approval(call, agent))
        decision = await self._decide_on_task(call, agent, trace, approval)  # 3. decide (task history read within)
        if approval is None and decision.outcome == "hold" and self._wait_seconds(call) > 0:
            approval = await self._hold_and_wait(call, agent, trace, decision)
            # The policy decides again, seeing the approval and the history as it is now.
            decision = await self._decide_on_task(call, agent, trace, approval)
        await self._enforce(call, agent, trace, decision, approval)  # 4. enforce
        credential = self._mint(call, agent, trace, decision)  # 5. mint
        # The allow event is queued first so that the audit writer and the task store work at once;
        # the call waits for both before anything leaves.
        allowed = self._record_decision(trace, decision, "allow", credential=credential)
        if credential.jti and credential.expires_at is not None:
            # Known to the store before it leaves: introspection and task revocation cover it.
            await self.tasks.record_credential(credential.jti, call.task_id, credential.expires_at)
        if trace.reservation is not None:
            await self.tasks.committed(trace.reservation.id)  # the reservation is durable before the call leaves
        await self._written(allowed)  # fail closed
        if approval is not None:
            self._record_approval_used(approval, decision, credential)
        return await self._forward_and_record(request, trace, decision, credential)

    async def _forward_and_record(self, request: web.BaseRequest, trace: Trace, decision: Decision,
                                  credential: MintedCredential) -> web.StreamResponse:
        """5-6. Forward, then record, in a task of its own: an agent hanging up cancels the handler, not the
        record of a call that reached its upstream. The reservation goes with it."""
        reservation, trace.reservation = trace.reservation, None
        finishing = self._run_to_completion(self._forward_then_record(request, trace, decision, credential, reservation))
        try:
            return await asyncio.shield(finishing)
        except asyncio.CancelledError:
            self.orphaned += 1
            trace.orphaned = True  # its body stays charged until the forwarding ends
            call = trace.call
            assert call is not None
            finishing.add_done_callback(lambda _: self._orphan_finished(call))
            raise

    def _orphan_finished(self, call: InterceptedCall) -> None:
        self.orphaned -= 1
        self.interceptor.release(call)

    async def _forward_then_record(self, request: web.BaseRequest, trace: Trace, decision: Decision,
                                   credential: MintedCredential, reservation: Reservation | None) -> web.StreamResponse:
        call = trace.call
        assert call is not None
        upstream_started = time.perf_counter()
        # A tools/list answer is learned event by event as it passes, whatever becomes of the relay.
        listing = any(c.method == "tools/list" for c in call.mcp_calls)
        tap = ResponseTap(lambda messages: self._learn_tools(call, messages)) if listing else None
        # The call joins its task's completed history as soon as the upstream answers, while the answer is
        # relayed: a reservation must never expire under an agent that reads the answer slowly.
        confirming: list[asyncio.Task[None]] = []

        def answered() -> None:
            confirming.append(self._run_to_completion(self._settle_confirmed(call, reservation)))

        def confirmed() -> Awaitable[None]:
            """The confirmation begun when the upstream answered, or one begun now."""
            return confirming[0] if confirming else self._settle_confirmed(call, reservation)

        try:
            response, result = await self.forwarder.forward(request, call, credential, decision.decision_id, tap,
                                                            on_answer=answered)
        except Refusal as refusal:  # the upstream could not be reached or did not answer in time
            refusal.decision_id = decision.decision_id
            self._record_upstream(trace, decision, None, 0, error=refusal.code)
            if confirming or refusal.extra.get("upstream_may_have_acted"):
                await confirmed()  # it may have acted: the call counts in its task
            else:
                await self._settle_released(call, reservation, refusal.code)
            raise
        except Exception as exc:  # noqa: BLE001 - recorded as forwarded, never as a refusal
            # Past the decision and the credential: the upstream may have acted, so the call counts as forwarded.
            log.warning("forwarding %s failed after it was sent: %s", decision.decision_id, type(exc).__name__)
            self._record_upstream(trace, decision, None, 0, error=type(exc).__name__)
            self.metrics.route(call.route.name).allowed.inc()
            await confirmed()
            return render_refusal(Refusal("upstream_error", "the upstream's answer could not be relayed",
                                          decision_id=decision.decision_id), call)
        route_metrics = self.metrics.route(call.route.name)
        route_metrics.upstream_seconds.observe(time.perf_counter() - upstream_started)
        route_metrics.allowed.inc()
        self._record_upstream(trace, decision, result.status, result.bytes_sent,  # 6. record
                              interrupted_by=result.interrupted_by)
        await confirmed()
        return response

    def _run_to_completion(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run ``work`` in a task of its own, kept until it ends (the sidecar's stop waits for these)."""
        task = asyncio.ensure_future(work)
        self.finishing.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self.finishing.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a handler that is gone cannot, and its handler logged or answered it

    async def drain(self, timeout_seconds: float = RECORD_DEADLINE_SECONDS) -> None:
        """On stop: let the calls being forwarded and recorded finish, then try the queued records once more
        (each step bounded)."""
        if self.finishing:
            await asyncio.wait(list(self.finishing), timeout=timeout_seconds)
        if len(self.backlog):
            await self.backlog.flush(timeout_seconds)

    async def _serve_tunnel(self, request: web.BaseRequest, trace: Trace) -> web.StreamResponse:
        """A blind tunnel: decided on host and port alone; no credential can be injected into it.

        On a route with ``intercept_tls`` nothing is decided here: TLS is terminated with a pod-CA leaf and
        each request inside is decided on its own, as on plain HTTP (sidecar/proxy/tls.py)."""
        host, port, route = self.interceptor.connect_target(request)
        if route.intercept_tls:
            return intercept_tunnel(request, host, port)
        call = trace.call = self.interceptor.intercept_connect(request)
        agent = trace.agent = self.identity.current()
        decision = await self._decide_on_task(call, agent, trace, None)
        await self._enforce(call, agent, trace, decision, None)
        await self._written(self._record_decision(trace, decision, "allow"))
        if trace.reservation is not None:
            await self.tasks.committed(trace.reservation.id)
        self.metrics.requests.labels(call.route.name, "allowed").inc()
        # The tunnel is open from here: the call counts as completed (what flows through it is not seen).
        reservation, trace.reservation = trace.reservation, None
        await asyncio.shield(self._run_to_completion(self._settle_confirmed(call, reservation)))
        return await run_tunnel(request, call.host, call.port)

    # ---------------------------------------------------------------- 2. context

    async def _task(self, call: InterceptedCall, agent: AgentIdentity, trace: Trace) -> int:
        """Read the task and its history (calls in flight included) into ``trace.task``; return the history's version."""
        assert call.task_id is not None
        found = await self.tasks.get(call.task_id)
        if found is None or not found[0].active(time.time()):
            raise Refusal("unknown_task", f"task {call.task_id} is unknown, expired or ended")
        task, summary = found
        if task.agent != agent.id:
            raise Refusal("unknown_task", f"task {call.task_id} belongs to another agent")
        version = summary.version  # read together with the history, before anything can change it
        trace.task = task.as_policy_input(summary)
        return version

    async def _presented_approval(self, call: InterceptedCall, agent: AgentIdentity) -> Approval:
        assert call.approval_id is not None
        approval = await self.approvals.get(call.approval_id)
        if approval is None:
            raise Refusal("approval_invalid", "unknown approval id", approval_id=call.approval_id)
        wrong = approval.binding.mismatch(self._binding(call, agent))
        if wrong:
            raise Refusal(MISMATCH_CODES[wrong], f"approval {approval.id} was made for another request ({wrong} differs)",
                          approval_id=approval.id, extra={"mismatch": wrong})
        if approval.status == "expired":
            self._record_approval_expired(approval)
        codes = {"pending": "approval_pending", "denied": "approval_denied", "expired": "approval_expired", "used": "approval_used"}
        if approval.status in codes:
            raise Refusal(codes[approval.status], f"approval {approval.id} is {approval.status}", approval_id=approval.id,
                          reasons=list(approval.reasons))
        return approval

    async def _standing_approval(self, call: InterceptedCall, agent: AgentIdentity) -> Approval | None:
        """An MCP client cannot add X-Agent-Approval to one call: the same tools/call (same tool, same
        arguments, any JSON-RPC id) finds the approval a human granted for it, and uses it once."""
        if mcp.call_binding(call) is None:
            return None
        found = await self.approvals.for_binding(self._binding(call, agent))
        return found if found is not None and found.status == "approved" else None

    # ---------------------------------------------------------------- 3. decide

    async def _decide_on_task(self, call: InterceptedCall, agent: AgentIdentity, trace: Trace,
                              approval: Approval | None) -> Decision:
        """Read the task's history, decide, and count the call in the history: one step for the task.

        In one sidecar a task's calls take turns (a per-task lock); across replicas the reservation is a
        compare-and-set on the history's version, and a decision that lost the race is made again on the
        fresh history (the lost one is audited as ``superseded``), at most DECISION_ATTEMPTS times."""
        if call.task_id is None:
            trace.task = None
            return await self._decide(call, agent, trace, approval)
        for attempt in range(1, DECISION_ATTEMPTS + 1):
            async with self.turns.turn(call.task_id):
                version = await self._task(call, agent, trace)
                decision = await self._decide_and_count(call, agent, trace, approval, version)
            if decision is not None:
                return decision
            self.metrics.task_decision_conflicts.inc()
            if attempt < DECISION_ATTEMPTS:
                self._record_decision(trace, trace.decisions[-1][0], "superseded", code="task_contended", receipt=False)
                trace.decisions.clear()
        raise Refusal("task_contended", f"task {call.task_id} changed under {DECISION_ATTEMPTS} decisions in a row",
                      decision_id=trace.decisions[-1][0].decision_id, headers={"Retry-After": "1"})

    async def _decide_and_count(self, call: InterceptedCall, agent: AgentIdentity, trace: Trace,
                                approval: Approval | None, version: int) -> Decision | None:
        """Within the task's turn: decide, then count the call before the next decision reads the history.

        A call that will be forwarded is reserved (None if the history moved past ``version``: decide again);
        a denied call, or a held one that will not wait for its approval, is recorded as it is. A call held
        although it carries an approval is held: the policy, seeing the approval, says it does not cover the
        call as things stand now (the risk rose and needs another approver), and only the policy judges."""
        try:
            decision = await self._decide(call, agent, trace, approval)
        except Refusal as refusal:
            if refusal.code == "denied":  # a policy obligation revoked the task
                await self._remember(trace, "deny")
            raise
        if decision.outcome == "allow":
            return decision if await self._reserve(call, trace, decision, version) else None
        if decision.outcome == "deny" or approval is not None or self._wait_seconds(call) <= 0:
            await self._remember(trace, decision.outcome)
        return decision

    async def _reserve(self, call: InterceptedCall, trace: Trace, decision: Decision, version: int) -> bool:
        """Reserve the allowed call's part of its task, if the history is still the one the decision read."""
        assert call.task_id is not None
        expires_at = time.time() + call.route.timeout_seconds + RESERVATION_MARGIN_SECONDS
        reservation = Reservation(decision.decision_id, _call_record(call, "allow", trace.decisions), expires_at)
        # Counted at once for the task's next decision; committed with the credential record of this call,
        # and awaited (tasks.committed) before the call leaves.
        if not await self.tasks.reserve(call.task_id, reservation, version=version, wait=False):
            return False
        trace.reservation = reservation
        return True

    async def _decide(self, call: InterceptedCall, agent: AgentIdentity, trace: Trace,
                      approval: Approval | None) -> Decision:
        """One decision per call; an MCP batch gets one per JSON-RPC request and the strictest wins."""
        approval_doc = ({"id": approval.id, "status": approval.status, "approvals": approval.approvals,
                         "group": approval.group, "rules": approval.rules} if approval else None)
        targets = call.mcp_calls or (None,)
        for mcp_call in targets:
            tool = mcp_call.tool if mcp_call else None
            document = JsonDocument(build_input(
                call, agent, trace.task, mcp_call=mcp_call, approval=approval_doc, delegation=trace.delegation,
                mcp_annotations=self._tool_hints(call, tool) if mcp_call else None,
                mcp_tool_changed=self.tool_catalog.changed(call.route.name, tool, call.task_id)))
            try:
                decision = await self.decider.decide(document)
            except Refusal as refusal:
                if refusal.code == "policy_unavailable":
                    self.metrics.policy_errors.labels(self.decider.engine.name, str(refusal.extra.get("policy_error", "error"))).inc()
                trace.decisions.append((_failed(refusal), document))
                raise
            self.metrics.decision_timer(self.decider.engine.name).observe(decision.eval_ns / 1e9)
            trace.decisions.append((decision, document))
        await self._revoke_if_obliged(call, trace)
        return _strictest([d for d, _ in trace.decisions])

    async def _revoke_if_obliged(self, call: InterceptedCall, trace: Trace) -> None:
        """Obligation revoke_task: the task ends, every credential issued for it is revoked, and this call is refused."""
        obliged = [d for d, _ in trace.decisions if "revoke_task" in d.obligations]
        if not obliged:
            return
        decision = obliged[0]
        if call.task_id is not None:
            await self._revoke_task_audited_first(call.task_id, decision)
        reasons = [*decision.reasons, "the task was revoked by a policy obligation"]
        raise Refusal("denied", "; ".join(reasons), reasons=reasons, decision_id=decision.decision_id)

    async def _revoke_task_audited_first(self, task_id: str, decision: Decision) -> None:
        """The revocation takes effect only once its audit event is written (with audit.fail_closed)."""
        await write_first(self.audit, {"type": "task.revoked", "task_id": task_id, "cause": "obligation",
                                       "decision_id": decision.decision_id, "reasons": list(decision.reasons)},
                          Refusal("audit_unavailable", "the audit log cannot be written; the task was not revoked "
                                  "and nothing is forwarded", decision_id=decision.decision_id),
                          required=self.audit_fail_closed)
        if await self.tasks.finish(task_id, "revoked") is not None:
            self.metrics.revocations.labels("obligation").inc()
        else:
            write_after(self.audit, {"type": "task.end_not_applied", "task_id": task_id, "cause": "obligation",
                                     "decision_id": decision.decision_id})

    def _tool_hints(self, call: InterceptedCall, tool: str | None) -> dict[str, Any] | None:
        server = self.tool_catalog.annotations(call.route.name, tool, call.task_id)
        return policy_hints(server, call.route.mcp, tool)

    def _learn_tools(self, call: InterceptedCall, messages: list[Any]) -> None:
        """A tools/list answer passed through: pin its definitions for the task, audit any that changed."""
        for change in self.tool_catalog.learn(call.route.name, messages, call.task_id):
            self._append_quietly({"type": "mcp.tool_changed", "route": call.route.name, "task_id": call.task_id,
                                  "tool": change.tool[:120], "fields": list(change.fields)})

    # ---------------------------------------------------------------- 4. enforce

    async def _enforce(self, call: InterceptedCall, agent: AgentIdentity, trace: Trace,
                       decision: Decision, approval: Approval | None) -> None:
        if decision.outcome == "deny":
            raise Refusal("denied", "; ".join(decision.reasons) or "denied by policy",
                          reasons=list(decision.reasons), decision_id=decision.decision_id)
        if decision.outcome == "hold":  # with an approval too: the policy saw it and holds the call still
            covered = f" (approval {approval.id} does not cover it now)" if approval is not None else ""
            trace.approval_id = await self._hold(call, agent, trace, decision)
            raise Refusal("approval_required", ("; ".join(decision.reasons) or "approval required") + covered,
                          reasons=list(decision.reasons), decision_id=decision.decision_id,
                          approval_id=trace.approval_id,
                          extra={"approval_status_url": f"/v1/approvals/{trace.approval_id}",
                                 "retry_with_header": "X-Agent-Approval"},
                          headers={"Retry-After": "10"})
        if approval is not None:
            # The human approved this exact request: single use, consumed before forwarding.
            if not await self.approvals.consume(approval.id):
                raise Refusal("approval_used", f"approval {approval.id} was already used", approval_id=approval.id)
            trace.approval_id = approval.id

    async def _hold(self, call: InterceptedCall, agent: AgentIdentity, trace: Trace, decision: Decision) -> str:
        # A call held again before the human decided gets that one approval (one per call held, not one per retry)
        # unless the policy now holds it otherwise: the store answers with it as it files (ApprovalStore.create).
        if mcp.call_binding(call) is not None:
            earlier = await self.approvals.for_binding(self._binding(call, agent))
            if earlier is not None and earlier.status == "denied":
                # A human said no to this very call in this task: the model reads that, nobody is asked again.
                raise Refusal("approval_denied", f"approval {earlier.id} was denied", reasons=list(decision.reasons),
                              decision_id=decision.decision_id, approval_id=earlier.id)
        now = time.time()
        policy_set_expiry = "expires_in_seconds" in (decision.result.get("approval") or {})
        expires_in = decision.approval.expires_in_seconds if policy_set_expiry else self.hold.default_expiry_seconds
        approval = Approval(
            id=new_approval_id(), binding=self._binding(call, agent), decision_id=decision.decision_id,
            route=call.route.name, reasons=list(decision.reasons), risk=decision.risk, rules=list(decision.rules),
            approvers_required=decision.approval.approvers, group=decision.approval.group,
            created_at=now, expires_at=now + expires_in,
            intent=trace.task["intent"] if trace.task else None,
            shown_target=self.hold.preview.mask_target(call.target_url),
            body=self.hold.preview.build(call, decision.reasons),  # masked and bounded: what the approver sees
        )
        # Filed and announced in a task of its own: the store may commit the approval whatever becomes of this
        # handler (SQLite's thread, a Redis command already sent), and a pending approval the humans can see and
        # approve is always announced (audit, webhook), even when the agent hangs up meanwhile.
        filing = self._run_to_completion(self._file_and_announce(call, agent, approval, decision))
        try:
            return await asyncio.shield(filing)
        except asyncio.CancelledError:
            self._outlive_agent(trace, self._run_to_completion(self._held_after_hang_up(trace, decision, filing)))
            raise

    async def _file_and_announce(self, call: InterceptedCall, agent: AgentIdentity, approval: Approval,
                                 decision: Decision) -> str:
        filed = await self._file(approval, decision)
        if filed is not approval:
            return filed.id
        self._append({"type": "approval.requested", "approval_id": approval.id, "decision_id": decision.decision_id,
                      "task_id": call.task_id, "agent": agent.id, "route": call.route.name,
                      "approvers_required": approval.approvers_required, "group": approval.group,
                      "expires_at": iso(approval.expires_at)})
        if self.hold.notifier is not None:
            self.hold.notifier.notify(approval)
        await self._refresh_pending_gauge()
        return approval.id

    async def _held_after_hang_up(self, trace: Trace, decision: Decision, filing: asyncio.Task[str]) -> None:
        """The agent hung up while its call's approval was filed: once it is, the call is audited as held and joins
        its task's history as held, as if the agent had stayed for the answer."""
        try:
            trace.approval_id = await filing
        except Exception:  # noqa: BLE001 - nothing was filed (the refusal was the handler's, which is gone)
            return
        try:
            self._record_decision(trace, decision, "hold", code="approval_required", receipt=False)
        except Refusal:
            pass  # counted by the sink
        await self._remember(trace, "hold")

    def _outlive_agent(self, trace: Trace, work: asyncio.Task[Any]) -> None:
        """The agent left while ``work`` still needs its call: the call stays charged (its body, in flight) until
        the work ends, as a call whose forwarding outlives its agent does."""
        call = trace.call
        assert call is not None
        self.orphaned += 1
        trace.orphaned = True
        work.add_done_callback(lambda _: self._orphan_finished(call))

    async def _file(self, approval: Approval, decision: Decision) -> Approval:
        """File a new approval, or refuse the call when its task or agent has approvals.max_pending_* waiting.

        The store looks for the call's pending approval, counts and files in one atomic step: a call that found
        none above may be the twin of one sent at once (on this sidecar or another), and the approval the store
        answers with, its twin's, is this call's too; it takes no second place and asks nobody again."""
        try:
            return await self.approvals.create(approval, self.hold.pending_limits)
        except Refusal as refusal:
            if refusal.code == "too_many_pending_approvals":
                refusal.decision_id, refusal.reasons = decision.decision_id, list(decision.reasons)
            raise

    def _wait_seconds(self, call: InterceptedCall) -> float:
        return min(call.prefer_wait_seconds or 0.0, self.hold.max_wait_seconds)

    async def _hold_and_wait(self, call: InterceptedCall, agent: AgentIdentity, trace: Trace, decision: Decision) -> Approval:
        """``Prefer: wait=N``: hold the call until a human decides, at most the configured cap."""
        approval_id = trace.approval_id = await self._hold(call, agent, trace, decision)
        self._record_decision(trace, decision, "hold", code="approval_required", receipt=False)
        trace.decisions.clear()  # recorded; what follows is recorded as its own event
        wait = self._wait_seconds(call)
        try:
            approval = await self.approvals.wait(approval_id, wait)
        except asyncio.CancelledError:
            # The agent hung up while it waited: its call was held and not forwarded; in its task's history as such.
            self._outlive_agent(trace, self._run_to_completion(self._remember(trace, "hold")))
            raise
        if approval is None or approval.status != "approved":
            await self._remember(trace, "hold")  # held, and not forwarded: in its task's history as such
        if approval is None:
            raise Refusal("approval_invalid", "the approval disappeared from the store", approval_id=approval_id)
        if approval.status == "approved":
            return approval
        if approval.status == "pending":
            raise Refusal("approval_required", f"not approved within {wait:g}s; retry later with X-Agent-Approval",
                          reasons=list(decision.reasons), decision_id=decision.decision_id, approval_id=approval_id,
                          extra={"approval_status_url": f"/v1/approvals/{approval_id}",
                                 "retry_with_header": "X-Agent-Approval"},
                          headers={"Retry-After": "10"})
        if approval.status == "expired":
            self._record_approval_expired(approval)
        code = {"denied": "approval_denied", "expired": "approval_expired"}.get(approval.status, "approval_invalid")
        raise Refusal(code, f"approval {approval_id} is {approval.status}", reasons=list(decision.reasons),
                      decision_id=decision.decision_id, approval_id=approval_id)

    def _record_approval_used(self, approval: Approval, decision: Decision, credential: MintedCredential) -> None:
        self._append({"type": "approval.used", "approval_id": approval.id, "decision_id": decision.decision_id,
                      "held_decision_id": approval.decision_id, "jti": credential.jti,
                      "task_id": approval.binding.task_id})
        self.metrics.approvals_resolved.labels("used").inc()

    def _record_approval_expired(self, approval: Approval) -> None:
        self._append({"type": "approval.expired", "approval_id": approval.id, "decision_id": approval.decision_id,
                      "task_id": approval.binding.task_id})
        self.metrics.approvals_resolved.labels("expired").inc()

    async def _refresh_pending_gauge(self) -> None:
        try:
            self.metrics.approvals_pending.set(await self.approvals.count_pending())
        except Refusal:
            pass  # the store's readiness check reports it; the gauge keeps its last value

    @staticmethod
    def _binding(call: InterceptedCall, agent: AgentIdentity) -> RequestBinding:
        return RequestBinding(call.method, call.target_url, mcp.call_binding(call) or call.body_sha256, agent.id, call.task_id,
                              call.route.name)

    # ---------------------------------------------------------------- 5. mint

    def _mint(self, call: InterceptedCall, agent: AgentIdentity, trace: Trace, decision: Decision) -> MintedCredential:
        minter = self.minters[call.route.name]
        try:
            credential = minter.mint(call, decision, subject=agent.id, task=trace.task, delegation=trace.delegation,
                                     approval_id=trace.approval_id)
        except (OSError, ValueError) as exc:
            raise Refusal("credential_unavailable", f"no credential for route {call.route.name}: {type(exc).__name__}",
                          decision_id=decision.decision_id) from None
        if credential.jti:
            self.metrics.route(call.route.name).credentials_minted.inc()
        return credential

    # ---------------------------------------------------------------- 6. record

    def _append(self, event: dict[str, Any], receipt: bool = True) -> AuditReceipt | None:
        """Queue an event (the writer thread writes it and counts failures); refuse if it cannot be queued."""
        try:
            return self.audit.append(event, receipt=receipt)
        except AuditError:
            if self.audit_fail_closed:
                raise Refusal("audit_unavailable", "the audit log cannot be written; nothing is forwarded") from None
            return None

    async def _written(self, receipts: list[AuditReceipt | None]) -> None:
        """Wait until these events are on disk; with fail_closed, refuse the call if one was not written."""
        for receipt in receipts:
            if receipt is not None and await receipt is None and self.audit_fail_closed:
                raise Refusal("audit_unavailable", "the audit log cannot be written; nothing is forwarded")

    def _record_decision(self, trace: Trace, decision: Decision, outcome: str, *, credential: MintedCredential | None = None,
                         code: str | None = None, receipt: bool = True) -> list[AuditReceipt | None]:
        call = trace.call
        receipts = []
        for each, document in trace.decisions or [(decision, {})]:
            receipts.append(self._append({
                "type": "decision",
                "decision_id": each.decision_id,
                "path": self.decider.decision_path,
                "input": _masked_input(document, self.hold.preview),  # approvals.mask_fields: no password in the audit
                "result": each.result or None,
                "metrics": {"timer_rego_query_eval_ns": each.eval_ns},
                # The policy that decided, as OPA's decision log names it: {bundle: {"revision": ...}}.
                "bundles": {name: {"revision": revision} for name, revision in each.bundles.items()},
                "outcome": outcome,
                "code": code,
                "route": call.route.name if call else None,
                "agent": trace.agent.id if trace.agent else None,
                "task_id": call.task_id if call else None,
                "approval_id": trace.approval_id,
                "jti": credential.jti if credential else None,
                "reasons": list(each.reasons),
            }, receipt))
        return receipts

    def _record_upstream(self, trace: Trace, decision: Decision, status: int | None, size: int,
                         error: str | None = None, interrupted_by: str | None = None) -> None:
        call = trace.call
        assert call is not None
        event: dict[str, Any] = {"type": "upstream", "decision_id": decision.decision_id, "task_id": call.task_id,
                                 "route": call.route.name, "status": status, "bytes": size}
        if error is not None:
            event["error"] = error
        if interrupted_by is not None:
            event["interrupted_by"] = interrupted_by  # the answer was not relayed whole: "agent" or "upstream"
        try:
            self.audit.append(event, receipt=False)
        except AuditError:
            pass  # counted by the sink; the call already went out, so do not lie to the agent

    async def _remember(self, trace: Trace, outcome: str) -> None:
        """A held or denied call joins its task's history as it is (once)."""
        call = trace.call
        if call is None or call.task_id is None or trace.remembered:
            return
        trace.remembered = True
        task_id, record = call.task_id, _call_record(call, outcome, trace.decisions)
        await self._write_record(call, None, "task_history", lambda: self.tasks.record(task_id, record))

    # ---------------------------------------------------------------- 6. record: reservations

    async def _settle_confirmed(self, call: InterceptedCall, reservation: Reservation | None) -> None:
        """The upstream answered: the reserved call becomes completed history."""
        if reservation is None or call.task_id is None:
            return
        task_id = call.task_id
        await self._write_record(call, reservation.id, "task_history", lambda: self.tasks.confirm(task_id, reservation))

    async def _settle_released(self, call: InterceptedCall, reservation: Reservation | None, cause: str) -> None:
        """The call did not reach the upstream (refused after its decision, failed, timed out): the reservation goes."""
        if reservation is None or call.task_id is None:
            return
        task_id = call.task_id
        self._append_quietly({"type": "reservation.released", "decision_id": reservation.id, "task_id": task_id,
                              "cause": cause})
        await self._write_record(call, reservation.id, "reservation", lambda: self.tasks.release(task_id, reservation.id))

    def _release_reservation(self, trace: Trace, cause: str) -> None:
        """The handler is refusing (or was cancelled) after its call was reserved: release, whatever happens next."""
        reservation, trace.reservation = trace.reservation, None
        if reservation is not None and trace.call is not None:
            self._run_to_completion(self._settle_released(trace.call, reservation, cause))

    async def _write_record(self, call: InterceptedCall, decision_id: str | None, record: str,
                            write: Callable[[], Awaitable[None]]) -> None:
        """A history write after the decision: within a deadline, or audited as ``record.failed`` and retried
        in the background. Never a refusal: the call's outcome is already decided (and may be forwarded)."""
        try:
            async with asyncio.timeout(RECORD_DEADLINE_SECONDS):
                await write()
            return
        except (Refusal, TimeoutError) as exc:
            error = exc.detail if isinstance(exc, Refusal) else f"no answer within {RECORD_DEADLINE_SECONDS:g}s"
        except Exception as exc:  # noqa: BLE001 - the call's outcome stands; the record is retried like any other
            log.error("%s record of %s failed: %s", record, decision_id, type(exc).__name__)
            error = f"the task store failed ({type(exc).__name__})"
        what = {"decision_id": decision_id, "task_id": call.task_id, "record": record}
        self.metrics.record_failures.labels(record).inc()
        self._append_quietly({"type": "record.failed", **what, "error": error, "retry": "background"})
        self.backlog.add(what, write)

    def _record_recovered(self, pending: PendingWrite) -> None:
        self._append_quietly({"type": "record.recovered", **pending.what})

    def _record_dropped(self, pending: PendingWrite) -> None:
        self.metrics.record_dropped.inc()
        self._append_quietly({"type": "record.dropped", **pending.what})

    def _append_quietly(self, event: dict[str, Any]) -> None:
        try:
            self.audit.append(event, receipt=False)
        except AuditError:
            pass  # counted by the sink: a record of what already happened never turns into a refusal

    async def _refuse(self, trace: Trace, refusal: Refusal) -> web.StreamResponse:
        call = trace.call
        route = call.route.name if call else "none"
        self.metrics.refusals.labels(refusal.code).inc()
        self.metrics.requests.labels(route, _outcome_label(refusal.code)).inc()
        try:
            if trace.decisions:
                decision = trace.decisions[-1][0]
                outcome = {"denied": "deny", "approval_required": "hold"}.get(refusal.code, "refused")
                self._record_decision(trace, decision, outcome, code=refusal.code, receipt=False)
            else:
                self.audit.append({"type": "refusal", "code": refusal.code, "detail": refusal.detail, "route": route,
                                   "task_id": call.task_id if call else None, "approval_id": refusal.approval_id},
                                  receipt=False)
        except (AuditError, Refusal):
            pass  # counted by the sink; the call is refused either way
        if refusal.code in ("denied", "approval_required", "too_many_pending_approvals"):
            # A call refused for too many pending approvals was held by the policy: its task counts it as held.
            await self._remember(trace, "deny" if refusal.code == "denied" else "hold")
        return render_refusal(refusal, call)


def _failed(refusal: Refusal) -> Decision:
    return Decision(decision_id=refusal.decision_id or random_uuid(), allow=False, require_approval=False,
                    reasons=tuple(refusal.reasons))


def _masked_input(document: dict[str, Any], preview: PreviewSettings) -> dict[str, Any]:
    """The policy input as audited: the body, the query and the MCP arguments with the masked fields' values replaced
    (a JsonDocument like the input itself, so that the audit writer knows its size: see DRAIN_BYTES)."""
    request, mcp_doc = document.get("request"), document.get("mcp")
    if not isinstance(request, dict):
        return document
    body, query, raw_query = request.get("body"), request.get("query"), request.get("raw_query")
    masked_request = {"body": preview.mask(body), "query": preview.mask_query_mapping(query),
                      "raw_query": preview.mask_query(raw_query) if isinstance(raw_query, str) else raw_query}
    arguments = mcp_doc.get("arguments") if isinstance(mcp_doc, dict) else None
    masked_arguments = preview.mask(arguments)
    if masked_arguments is arguments and all(masked_request[name] is request.get(name) for name in masked_request):
        return document  # the very input the engine judged: its bytes are embedded as they are
    masked = dict(document)
    masked["request"] = {**request, **masked_request}
    if isinstance(mcp_doc, dict) and "arguments" in mcp_doc:
        masked["mcp"] = {**mcp_doc, "arguments": masked_arguments}
    return JsonDocument(masked)


def _strictest(decisions: list[Decision]) -> Decision:
    order = {"deny": 0, "hold": 1, "allow": 2}
    return min(decisions, key=lambda d: order[d.outcome])


def _outcome_label(code: str) -> str:
    return {"denied": "denied", "approval_required": "approval_required"}.get(code, "error" if code.endswith("unavailable") or code.startswith("upstream") else "refused")


def _call_record(call: InterceptedCall, outcome: str, decisions: list[tuple[Decision, Any]]) -> CallRecord:
    """What a call adds to its task's history (its reservation, when it is allowed): per measure, the larger
    of what the route's measures found and what its decisions say they judged (the policy may read an
    amount where no measure looks: the query, an array body, another field)."""
    payloads = [payload(call.body_json, c) for c in call.mcp_calls] if call.mcp_calls else [call.body_json]
    measures = summed_measures(effective_measures(call.route.measures), payloads)
    judged = summed_measures_of([decision.measures for decision, _ in decisions])
    for name, value in judged.items():
        measures[name] = max(measures.get(name, 0.0), value)
    labels = call.route.labels
    tool = next((c.tool for c in call.mcp_calls if c.method == "tools/call" and c.tool), None)
    return CallRecord(
        route=call.route.name, method=call.method, path=call.path, host=call.host, outcome=outcome,
        at=iso_ms(time.time()), amount=measures.get("amount", 0.0), records=measures.get("records", 0.0),
        classification=str(labels["data_classification"]) if "data_classification" in labels else None,
        external=destination_external(labels, call.host), write=call.method not in READ_METHODS,
        measures=measures, tool=tool[:120] if tool else None,
        # An MCP request is a POST whatever it does, and any of them can return the server's data: each reads
        # its route's classification (the exfiltration chain); notifications and responses get no answer.
        reads=any(c.is_request for c in call.mcp_calls) if call.mcp_calls else None,
    )


def render_refusal(refusal: Refusal, call: InterceptedCall | None) -> web.Response:
    """problem+json; for an MCP message, JSON-RPC answers the client can read (sidecar/proxy/mcp_refusal.py)."""
    if call is not None and call.is_mcp:
        return mcp_refusal.answer(refusal, call)
    return web.Response(status=refusal.status, body=refusal.problem_json(),
                        content_type="application/problem+json", headers=dict(refusal.headers))
