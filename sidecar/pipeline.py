"""The request path, in order: intercept, context, decide, enforce, mint, forward, record.

Each step is a module with a narrow interface; this file only sequences them
and turns every refusal into one answer and one audit event.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from .approvals import Approval, ApprovalStore, RequestBinding
from .approvals.desk import HoldSettings
from .approvals.store import new_approval_id
from .audit import AuditError, AuditSink
from .audit.writer import Receipt as AuditReceipt
from .context import AgentIdentity, build_input
from .delegation import DelegationVerifier
from .credentials import CredentialMinter
from .documents import Decision, InterceptedCall, MintedCredential
from .observability.metrics import Metrics
from .policy import Decider
from .problems import Refusal
from .proxy.forward import Forwarder
from .proxy.intercept import Interceptor
from .proxy.mcp_catalog import ResponseTap, ToolCatalog, jsonrpc_messages
from .proxy.tunnel import run_tunnel
from .tasks import CallRecord, TaskStore
from .tasks.measures import destination_external, effective_measures, payload, summed_measures
from .tasks.store import iso

log = logging.getLogger("sidecar.pipeline")

# RequestBinding field that differs -> its refusal code.
MISMATCH_CODES = {"method": "approval_wrong_method", "target": "approval_wrong_target",
                  "body_sha256": "approval_wrong_body", "agent": "approval_wrong_agent", "task_id": "approval_wrong_task"}

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


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
    tool_catalog: ToolCatalog = field(default_factory=ToolCatalog)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        trace = Trace()
        if self.in_flight >= self.max_in_flight:
            # Admission control keeps memory bounded under a flood: refused at once, never queued.
            return await self._refuse(trace, Refusal("overloaded", f"{self.in_flight} calls in flight (limit {self.max_in_flight})",
                                                     headers={"Retry-After": "1"}))
        self.in_flight += 1
        try:
            return await self._serve(request, trace)
        except Refusal as refusal:
            return await self._refuse(trace, refusal)
        except Exception as exc:  # noqa: BLE001 - fail closed on anything unforeseen
            log.exception("unhandled error on the request path")
            return await self._refuse(trace, Refusal("internal_error", f"internal error ({type(exc).__name__})"))
        finally:
            self.in_flight -= 1

    async def _serve(self, request: web.BaseRequest, trace: Trace) -> web.StreamResponse:
        if request.method == "CONNECT":
            return await self._serve_tunnel(request, trace)
        call = trace.call = await self.interceptor.intercept(request)  # 1. intercept
        agent = trace.agent = self.identity.current()  # 2. context
        trace.delegation = await self.delegation.chain(call.delegation.reveal() if call.delegation else None)
        trace.task = await self._task(call, agent)
        approval = await self._presented_approval(call, agent) if call.approval_id else None
        decision = await self._decide(call, agent, trace, approval)  # 3. decide
        if approval is None and decision.outcome == "hold" and self._wait_seconds(call) > 0:
            approval = await self._hold_and_wait(call, agent, trace, decision)
            decision = await self._decide(call, agent, trace, approval)  # the policy decides again, seeing the approval
        await self._enforce(call, agent, trace, decision, approval)  # 4. enforce
        credential = self._mint(call, agent, trace, decision)  # 5. mint
        # The allow event is queued first so that the audit writer and the task store work at once;
        # the call waits for both before anything leaves.
        allowed = self._record_decision(trace, decision, "allow", credential=credential)
        if credential.jti and credential.expires_at is not None:
            # Known to the store before it leaves: introspection and task revocation cover it.
            await self.tasks.record_credential(credential.jti, call.task_id, credential.expires_at)
        await self._written(allowed)  # fail closed
        if approval is not None:
            self._record_approval_used(approval, decision, credential)
        upstream_started = time.perf_counter()
        tap = ResponseTap() if any(c.method == "tools/list" for c in call.mcp_calls) else None
        response, result = await self.forwarder.forward(request, call, credential, decision.decision_id, tap)
        route_metrics = self.metrics.route(call.route.name)
        route_metrics.upstream_seconds.observe(time.perf_counter() - upstream_started)
        if tap is not None:
            self.tool_catalog.learn(call.route.name, jsonrpc_messages(tap.body(), result.content_type))
        self._record_upstream(trace, decision, result.status, result.bytes_sent)  # 6. record
        await self._remember(trace, "allow")
        route_metrics.allowed.inc()
        return response

    async def _serve_tunnel(self, request: web.BaseRequest, trace: Trace) -> web.StreamResponse:
        """A blind tunnel: decided on host and port alone; no credential can be injected into it."""
        call = trace.call = self.interceptor.intercept_connect(request)
        agent = trace.agent = self.identity.current()
        trace.task = await self._task(call, agent)
        decision = await self._decide(call, agent, trace, None)
        await self._enforce(call, agent, trace, decision, None)
        await self._written(self._record_decision(trace, decision, "allow"))
        self.metrics.requests.labels(call.route.name, "allowed").inc()
        return await run_tunnel(request, call.host, call.port)

    # ---------------------------------------------------------------- 2. context

    async def _task(self, call: InterceptedCall, agent: AgentIdentity) -> dict[str, Any] | None:
        if call.task_id is None:
            return None
        found = await self.tasks.get(call.task_id)
        if found is None or not found[0].active(time.time()):
            raise Refusal("unknown_task", f"task {call.task_id} is unknown, expired or ended")
        task, summary = found
        if task.agent != agent.id:
            raise Refusal("unknown_task", f"task {call.task_id} belongs to another agent")
        return task.as_input(summary)

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

    # ---------------------------------------------------------------- 3. decide

    async def _decide(self, call: InterceptedCall, agent: AgentIdentity, trace: Trace,
                      approval: Approval | None) -> Decision:
        """One decision per call; an MCP batch gets one per JSON-RPC request and the strictest wins."""
        approval_doc = {"id": approval.id, "status": approval.status, "approvals": approval.approvals} if approval else None
        targets = call.mcp_calls or (None,)
        for mcp_call in targets:
            document = build_input(call, agent, trace.task, mcp_call=mcp_call, approval=approval_doc,
                                   delegation=trace.delegation,
                                   mcp_annotations=self.tool_catalog.annotations(call.route.name, mcp_call.tool) if mcp_call else None)
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
        if call.task_id is not None and await self.tasks.finish(call.task_id, "revoked") is not None:
            self.metrics.revocations.labels("obligation").inc()
            self._append({"type": "task.revoked", "task_id": call.task_id, "cause": "obligation",
                          "decision_id": decision.decision_id, "reasons": list(decision.reasons)})
        reasons = [*decision.reasons, "the task was revoked by a policy obligation"]
        raise Refusal("denied", "; ".join(reasons), reasons=reasons, decision_id=decision.decision_id)

    # ---------------------------------------------------------------- 4. enforce

    async def _enforce(self, call: InterceptedCall, agent: AgentIdentity, trace: Trace,
                       decision: Decision, approval: Approval | None) -> None:
        if decision.outcome == "deny":
            raise Refusal("denied", "; ".join(decision.reasons) or "denied by policy",
                          reasons=list(decision.reasons), decision_id=decision.decision_id)
        if approval is not None:
            # The human approved this exact request: single use, consumed before forwarding.
            if not await self.approvals.consume(approval.id):
                raise Refusal("approval_used", f"approval {approval.id} was already used", approval_id=approval.id)
            trace.approval_id = approval.id
            return
        if decision.outcome == "hold":
            trace.approval_id = await self._hold(call, agent, trace, decision)
            raise Refusal("approval_required", "; ".join(decision.reasons) or "approval required",
                          reasons=list(decision.reasons), decision_id=decision.decision_id,
                          approval_id=trace.approval_id,
                          extra={"approval_status_url": f"/v1/approvals/{trace.approval_id}",
                                 "retry_with_header": "X-Agent-Approval"},
                          headers={"Retry-After": "10"})

    async def _hold(self, call: InterceptedCall, agent: AgentIdentity, trace: Trace, decision: Decision) -> str:
        now = time.time()
        policy_set_expiry = "expires_in_seconds" in (decision.result.get("approval") or {})
        expires_in = decision.approval.expires_in_seconds if policy_set_expiry else self.hold.default_expiry_seconds
        approval = Approval(
            id=new_approval_id(), binding=self._binding(call, agent), decision_id=decision.decision_id,
            route=call.route.name, reasons=list(decision.reasons), risk=decision.risk,
            approvers_required=decision.approval.approvers, group=decision.approval.group,
            created_at=now, expires_at=now + expires_in,
            intent=trace.task["intent"] if trace.task else None,
        )
        await self.approvals.create(approval)
        self._append({"type": "approval.requested", "approval_id": approval.id, "decision_id": decision.decision_id,
                      "task_id": call.task_id, "agent": agent.id, "route": call.route.name,
                      "approvers_required": approval.approvers_required, "group": approval.group,
                      "expires_at": iso(approval.expires_at)})
        if self.hold.notifier is not None:
            self.hold.notifier.notify(approval)
        await self._refresh_pending_gauge()
        return approval.id

    def _wait_seconds(self, call: InterceptedCall) -> float:
        return min(call.prefer_wait_seconds or 0.0, self.hold.max_wait_seconds)

    async def _hold_and_wait(self, call: InterceptedCall, agent: AgentIdentity, trace: Trace, decision: Decision) -> Approval:
        """``Prefer: wait=N``: hold the call until a human decides, at most the configured cap."""
        approval_id = trace.approval_id = await self._hold(call, agent, trace, decision)
        self._record_decision(trace, decision, "hold", code="approval_required", receipt=False)
        trace.decisions.clear()  # recorded; what follows is recorded as its own event
        wait = self._wait_seconds(call)
        approval = await self.approvals.wait(approval_id, wait)
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
        return RequestBinding(call.method, call.target_url, call.body_sha256, agent.id, call.task_id)

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
                "input": document,
                "result": each.result or None,
                "metrics": {"timer_rego_query_eval_ns": each.eval_ns},
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

    def _record_upstream(self, trace: Trace, decision: Decision, status: int, size: int) -> None:
        call = trace.call
        assert call is not None
        try:
            self.audit.append({"type": "upstream", "decision_id": decision.decision_id, "task_id": call.task_id,
                               "route": call.route.name, "status": status, "bytes": size}, receipt=False)
        except AuditError:
            pass  # counted by the sink; the call already went out, so do not lie to the agent

    async def _remember(self, trace: Trace, outcome: str) -> None:
        call = trace.call
        if call is not None and call.task_id is not None:
            await self.tasks.record(call.task_id, _call_record(call, outcome))

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
        if refusal.code in ("denied", "approval_required"):
            await self._remember(trace, "deny" if refusal.code == "denied" else "hold")
        return render_refusal(refusal, call)


def _failed(refusal: Refusal) -> Decision:
    return Decision(decision_id=refusal.decision_id or str(uuid.uuid4()), allow=False, require_approval=False,
                    reasons=tuple(refusal.reasons))


def _strictest(decisions: list[Decision]) -> Decision:
    order = {"deny": 0, "hold": 1, "allow": 2}
    return min(decisions, key=lambda d: order[d.outcome])


def _outcome_label(code: str) -> str:
    return {"denied": "denied", "approval_required": "approval_required"}.get(code, "error" if code.endswith("unavailable") or code.startswith("upstream") else "refused")


def _call_record(call: InterceptedCall, outcome: str) -> CallRecord:
    payloads = [payload(call.body_json, c) for c in call.mcp_calls] if call.mcp_calls else [call.body_json]
    measures = summed_measures(effective_measures(call.route.measures), payloads)
    labels = call.route.labels
    tool = next((c.tool for c in call.mcp_calls if c.method == "tools/call" and c.tool), None)
    return CallRecord(
        route=call.route.name, method=call.method, path=call.path, host=call.host, outcome=outcome,
        at=iso(time.time()), amount=measures.get("amount", 0.0), records=measures.get("records", 0.0),
        classification=str(labels["data_classification"]) if "data_classification" in labels else None,
        external=destination_external(labels, call.host), write=call.method not in READ_METHODS,
        measures=measures, tool=tool[:120] if tool else None,
    )


def render_refusal(refusal: Refusal, call: InterceptedCall | None) -> web.Response:
    """problem+json; for MCP a JSON-RPC error per request id, at the same non-2xx status."""
    headers = dict(refusal.headers)
    if call is not None and call.is_mcp:
        errors = [refusal.jsonrpc_error(c.id) for c in call.mcp_calls if c.id is not None]
        if not errors:
            errors = [refusal.jsonrpc_error(None)]
        payload: Any = errors if call.mcp_calls[0].batch_index is not None else errors[0]
        return web.Response(status=refusal.status, body=json.dumps(payload).encode(),
                            content_type="application/json", headers=headers)
    return web.Response(status=refusal.status, body=refusal.problem_json(),
                        content_type="application/problem+json", headers=headers)
