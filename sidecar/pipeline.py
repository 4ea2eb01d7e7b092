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
from .approvals.store import new_approval_id
from .audit import AuditError, AuditSink
from .context import AgentIdentity, build_input
from .credentials import CredentialMinter
from .documents import Decision, InterceptedCall, MintedCredential
from .observability.metrics import Metrics
from .policy import Decider
from .problems import Refusal
from .proxy.forward import Forwarder
from .proxy.intercept import Interceptor
from .tasks import CallRecord, TaskStore
from .tasks.store import iso

log = logging.getLogger("sidecar.pipeline")

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

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        trace = Trace()
        try:
            return await self._serve(request, trace)
        except Refusal as refusal:
            return await self._refuse(trace, refusal)
        except Exception as exc:  # noqa: BLE001 - fail closed on anything unforeseen
            log.exception("unhandled error on the request path")
            return await self._refuse(trace, Refusal("internal_error", f"internal error ({type(exc).__name__})"))

    async def _serve(self, request: web.BaseRequest, trace: Trace) -> web.StreamResponse:
        if request.method == "CONNECT":
            raise Refusal("tunnel_denied", "CONNECT tunnels are not offered by this sidecar yet; send plain HTTP through the proxy")
        call = trace.call = await self.interceptor.intercept(request)  # 1. intercept
        agent = trace.agent = self.identity.current()  # 2. context
        trace.task = await self._task(call, agent)
        approval = await self._presented_approval(call, agent) if call.approval_id else None
        decision = await self._decide(call, agent, trace, approval)  # 3. decide
        await self._enforce(call, agent, trace, decision, approval)  # 4. enforce
        credential = self._mint(call, agent, trace, decision)  # 5. mint
        self._record_decision(trace, decision, "allow", credential=credential)  # recorded before forwarding: fail closed
        upstream_started = time.perf_counter()
        response, result = await self.forwarder.forward(request, call, credential, decision.decision_id)
        self.metrics.upstream_seconds.labels(call.route.name).observe(time.perf_counter() - upstream_started)
        self._record_upstream(trace, decision, result.status, result.bytes_sent)  # 6. record
        await self._remember(trace, "allow")
        self.metrics.requests.labels(call.route.name, "allowed").inc()
        return response

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
            raise Refusal("approval_invalid", f"approval {approval.id} was made for another request ({wrong} differs)",
                          approval_id=approval.id)
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
            document = build_input(call, agent, trace.task, mcp_call=mcp_call, approval=approval_doc)
            try:
                decision = await self.decider.decide(document)
            except Refusal as refusal:
                self.metrics.policy_errors.labels(self.decider.engine.name, str(refusal.extra.get("policy_error", "error"))).inc()
                trace.decisions.append((_failed(refusal), document))
                raise
            self.metrics.decision_seconds.labels(self.decider.engine.name).observe(decision.eval_ns / 1e9)
            trace.decisions.append((decision, document))
        return _strictest([d for d, _ in trace.decisions])

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
        approval = Approval(
            id=new_approval_id(), binding=self._binding(call, agent), decision_id=decision.decision_id,
            route=call.route.name, reasons=list(decision.reasons), risk=decision.risk,
            approvers_required=decision.approval.approvers, group=decision.approval.group,
            created_at=now, expires_at=now + decision.approval.expires_in_seconds,
            intent=trace.task["intent"] if trace.task else None,
        )
        await self.approvals.create(approval)
        return approval.id

    @staticmethod
    def _binding(call: InterceptedCall, agent: AgentIdentity) -> RequestBinding:
        return RequestBinding(call.method, call.target_url, call.body_sha256, agent.id, call.task_id)

    # ---------------------------------------------------------------- 5. mint

    def _mint(self, call: InterceptedCall, agent: AgentIdentity, trace: Trace, decision: Decision) -> MintedCredential:
        minter = self.minters[call.route.name]
        try:
            credential = minter.mint(call, decision, subject=agent.id, task=trace.task, delegation=[],
                                     approval_id=trace.approval_id)
        except (OSError, ValueError) as exc:
            raise Refusal("credential_unavailable", f"no credential for route {call.route.name}: {type(exc).__name__}",
                          decision_id=decision.decision_id) from None
        if credential.jti:
            self.metrics.credentials_minted.labels(call.route.name).inc()
        return credential

    # ---------------------------------------------------------------- 6. record

    def _append(self, event: dict[str, Any]) -> None:
        try:
            self.audit.append(event)
        except AuditError:
            self.metrics.audit_write_errors.inc()
            if self.audit_fail_closed:
                raise Refusal("audit_unavailable", "the audit log cannot be written; nothing is forwarded") from None

    def _record_decision(self, trace: Trace, decision: Decision, outcome: str, *,
                         credential: MintedCredential | None = None, code: str | None = None) -> None:
        call = trace.call
        for each, document in trace.decisions or [(decision, {})]:
            self._append({
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
            })

    def _record_upstream(self, trace: Trace, decision: Decision, status: int, size: int) -> None:
        call = trace.call
        assert call is not None
        try:
            self.audit.append({"type": "upstream", "decision_id": decision.decision_id, "task_id": call.task_id,
                               "route": call.route.name, "status": status, "bytes": size})
        except AuditError:
            self.metrics.audit_write_errors.inc()  # the call already went out; count, do not lie to the agent

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
                self._record_decision(trace, decision, outcome, code=refusal.code)
            else:
                self.audit.append({"type": "refusal", "code": refusal.code, "detail": refusal.detail, "route": route,
                                   "task_id": call.task_id if call else None, "approval_id": refusal.approval_id})
        except (AuditError, Refusal):
            self.metrics.audit_write_errors.inc()
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
    body = call.body_json if isinstance(call.body_json, dict) else {}
    amount = body.get("amount") if isinstance(body.get("amount"), (int, float)) else 0
    records = body.get("records") if isinstance(body.get("records"), (int, float)) else 0
    labels = call.route.labels
    return CallRecord(
        route=call.route.name, method=call.method, path=call.path, host=call.host, outcome=outcome,
        at=iso(time.time()), amount=float(amount or 0), records=float(records or 0),
        classification=str(labels["data_classification"]) if "data_classification" in labels else None,
        external=bool(labels.get("external", False)), write=call.method not in READ_METHODS,
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
