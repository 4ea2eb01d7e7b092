"""``agent-sidecar audit show --task ID``: one task's whole chain as a readable timeline.

It gathers every event of the task (by ``task_id``) and every event linked to
them by decision id or approval id, in chain order, and renders declared
intent, calls, decisions with their reasons, approvals with their approvers,
credentials by jti and upstream results. The chain itself is verified first and
its state is printed at the top, so a reader knows whether to trust the story.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .chain import VerifyResult, read_events, verify_files

GAP = "  "  # between the stamp column and the event, whatever the width of either


@dataclass
class Timeline:
    task_id: str
    events: list[dict[str, Any]] = field(default_factory=list)
    verified: VerifyResult | None = None

    @property
    def opened(self) -> dict[str, Any] | None:
        """The ``task.opened`` event: the declared intent as the task was opened, and who opened it."""
        for event in self.events:
            if event.get("type") == "task.opened":
                return event
        return None

    @property
    def intent(self) -> str | None:
        opened = self.opened
        if opened is not None and isinstance(opened.get("intent"), str):
            return str(opened["intent"])
        for event in self.events:
            intent = event.get("intent") or _dig(event, "input", "task", "intent")
            if isinstance(intent, str):
                return intent
        return None

    @property
    def agent(self) -> str | None:
        for event in self.events:
            if isinstance(event.get("agent"), str):
                return str(event["agent"])
        return None


def task_timeline(paths: list[Path], task_id: str) -> Timeline:
    """The task's events, and events linked to them by decision or approval id, in chain order."""
    timeline = Timeline(task_id, verified=verify_files(paths, partial=True))
    decisions: set[str] = set()
    approvals: set[str] = set()
    for _, event in read_events(paths):
        if event is None:
            continue
        linked = event.get("decision_id") in decisions or event.get("approval_id") in approvals
        if event.get("task_id") == task_id or linked:
            _collect_links(event, decisions, approvals)
            timeline.events.append(event)
    return timeline


def _collect_links(event: dict[str, Any], decisions: set[str], approvals: set[str]) -> None:
    for key, into in (("decision_id", decisions), ("held_decision_id", decisions), ("approval_id", approvals)):
        value = event.get(key)
        if isinstance(value, str):
            into.add(value)


# ---------------------------------------------------------------- rendering


def render(timeline: Timeline, files: list[Path]) -> str:
    lines = [f"Task {timeline.task_id}"]
    intent = timeline.intent
    lines.append(f"  intent    {_quote(intent) if intent else '(no declared intent recorded)'}")
    opened = timeline.opened
    if opened is not None:
        lines.append(f"  opened    {opened.get('timestamp', '?')} by {opened.get('agent') or '(unknown)'}"
                     + (f", ttl {opened['ttl_seconds']} s" if opened.get("ttl_seconds") else ""))
    else:
        lines.append("  opened    (no task.opened event in these files)")
    lines.append(f"  agent     {timeline.agent or '(unknown)'}")
    lines.append(f"  chain     {_chain_state(timeline.verified, files)}")
    if not timeline.events:
        lines.append("")
        lines.append(f"  no events for task {timeline.task_id} in {', '.join(str(f) for f in files)}")
        return "\n".join(lines) + "\n"
    lines.append(f"  events    {len(timeline.events)} (seq {timeline.events[0].get('seq')}..{timeline.events[-1].get('seq')})")
    lines.append("")
    stamps = [_stamp(event) for event in timeline.events]
    width = max(len(stamp) for stamp in stamps)
    for stamp, event in zip(stamps, timeline.events):
        lines.extend(_render_event(event, stamp, width))
    return "\n".join(lines) + "\n"


def _stamp(event: dict[str, Any]) -> str:
    return f"{event.get('timestamp', '?')}  #{event.get('seq', '?')}"


def _chain_state(result: VerifyResult | None, files: list[Path]) -> str:
    if result is None:
        return "not verified"
    if result.ok:
        return f"verified, {result.events} events in {len(files)} file(s)"
    return f"BROKEN after {result.events} events: {result.problem}"


def _render_event(event: dict[str, Any], stamp: str, width: int) -> list[str]:
    """The stamp column is ``width`` wide for every event of the timeline, so heads line up at any event number."""
    kind = str(event.get("type", "event"))
    renderer = _RENDERERS.get(kind) or _RENDERERS.get(kind.split(".")[0], _render_other)
    head, details = renderer(event)
    indent = " " * (width + len(GAP))
    return [f"{stamp:<{width}}{GAP}{head}"] + [indent + detail for detail in details if detail]


def _target(request: dict[str, Any]) -> str:
    """The request target as forwarded upstream: scheme, host, port, path and query."""
    host = str(request.get("host", ""))
    if ":" in host:
        host = f"[{host}]"
    port = f":{request['port']}" if request.get("port") not in (None, "") else ""
    scheme = f"{request['scheme']}://" if request.get("scheme") else "//"
    query = request.get("raw_query")
    return f"{scheme}{host}{port}{request.get('path', '')}" + (f"?{query}" if query else "")


def _render_decision(event: dict[str, Any]) -> tuple[str, list[str]]:
    outcome = str(event.get("outcome", "?"))
    request = _dig(event, "input", "request") or {}
    call = f"{request.get('method', '?')} {_target(request)}" if isinstance(request, dict) and request else ""
    mcp = _dig(event, "input", "mcp")
    if isinstance(mcp, dict) and mcp.get("tool"):
        call += f"  mcp tool {mcp['tool']}"
    head = f"DECISION  {outcome.upper():<9} {event.get('route') or '-'}  {call}".rstrip()
    result = event.get("result") if isinstance(event.get("result"), dict) else {}
    risk = result.get("risk") if result else None
    facts = [f"decision {event.get('decision_id')}"]
    if risk:
        facts.append(f"risk {risk}")
    eval_ns = _dig(event, "metrics", "timer_rego_query_eval_ns")
    if isinstance(eval_ns, int) and eval_ns:
        facts.append(f"eval {eval_ns / 1e6:.2f} ms")
    bundles = event.get("bundles")  # the policy that decided (issue 19): {name: {"revision": ...}}
    if isinstance(bundles, dict) and bundles:
        facts.append("policy " + ", ".join(f"{name} {entry.get('revision')}" for name, entry in sorted(bundles.items())
                                           if isinstance(entry, dict)))
    if event.get("code") and event.get("code") not in ("denied", "approval_required"):
        facts.append(f"refused: {event['code']}")
    details = ["  ".join(facts)]
    details += [f"reason: {reason}" for reason in event.get("reasons") or []]
    if event.get("approval_id"):
        details.append(f"approval {event['approval_id']}")
    presented = _dig(event, "input", "approval")
    if isinstance(presented, dict) and presented.get("approvals"):
        details.append("approved by " + ", ".join(_approver(a) for a in presented["approvals"]))
    if event.get("jti"):
        credential = result.get("credential") if result else None
        scopes = " ".join(credential.get("scopes", [])) if isinstance(credential, dict) else ""
        details.append(f"credential jti {event['jti']}" + (f"  scope {scopes}" if scopes else ""))
    return head, details


def _render_upstream(event: dict[str, Any]) -> tuple[str, list[str]]:
    return (f"UPSTREAM  {event.get('status', '?'):<9} {event.get('route') or '-'}  {event.get('bytes', 0)} bytes",
            [f"decision {event.get('decision_id')}"])


def _render_refusal(event: dict[str, Any]) -> tuple[str, list[str]]:
    return (f"REFUSED   {str(event.get('code', '?')):<9} {event.get('route') or '-'}",
            [str(event.get("detail") or ""), f"approval {event['approval_id']}" if event.get("approval_id") else ""])


def _render_approval(event: dict[str, Any]) -> tuple[str, list[str]]:
    action = str(event.get("type", "approval.?")).split(".", 1)[-1]
    details = [f"approval {event.get('approval_id')}"]
    if action == "refused":  # an approver's action the sidecar refused: who claimed to act, and why not
        who = event.get("approver") or "(no identity in the token)"
        verified = "" if event.get("approver_verified") else " (claimed, not verified)"
        error = f", token {event['token_error']}" if event.get("token_error") else ""
        details.append(f"{event.get('action', '?')} by {who}{verified} refused: {event.get('code')}{error}")
        details.append(str(event.get("detail") or ""))
        return "APPROVAL  REFUSED", details
    if event.get("approver"):
        progress = f" ({event['approvals']}/{event['approvers_required']})" if event.get("approvers_required") else ""
        comment = f": {_quote(str(event['comment']))}" if event.get("comment") else ""
        details.append(f"by {event['approver']}{progress}{comment}")
    elif event.get("approvers_required"):
        group = f" from group {event['group']}" if event.get("group") else ""
        details.append(f"needs {event['approvers_required']} approver(s){group}, expires {event.get('expires_at', '?')}")
    if event.get("jti"):
        details.append(f"credential jti {event['jti']}")
    return f"APPROVAL  {action.upper()}", details


def _render_task(event: dict[str, Any]) -> tuple[str, list[str]]:
    action = str(event.get("type", "task.?")).split(".", 1)[-1]
    details = []
    if event.get("intent"):
        details.append(f"intent {_quote(str(event['intent']))}")
    if action == "opened":
        details.append(f"by {event.get('agent') or '(unknown)'}"
                       + (f", ttl {event['ttl_seconds']} s" if event.get("ttl_seconds") else "")
                       + (f", expires {_when(event['expires_at'])}" if event.get("expires_at") else ""))
        if event.get("allowed_tools"):
            details.append("allowed tools " + ", ".join(str(t) for t in event["allowed_tools"]))
    if event.get("cause"):
        details.append(f"cause {event['cause']}")
    if action in ("completed", "revoked"):
        details.append("every credential issued for the task is revoked")
    return f"TASK      {action.upper()}", details


def _render_other(event: dict[str, Any]) -> tuple[str, list[str]]:
    skip = {"seq", "timestamp", "chain", "prev_hash", "hash", "type", "task_id"}
    facts = [f"{key} {value}" for key, value in event.items() if key not in skip and value not in (None, "", [])]
    return f"{str(event.get('type', 'EVENT')).upper()}", ["  ".join(facts)[:300]]


_RENDERERS = {
    "decision": _render_decision,
    "upstream": _render_upstream,
    "refusal": _render_refusal,
    "approval": _render_approval,
    "task": _render_task,
}


def _approver(entry: Any) -> str:
    if isinstance(entry, dict):
        return str(entry.get("approver") or entry.get("sub") or "?")
    return str(entry)


def _when(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(value))
    return str(value)


def _quote(text: str) -> str:
    text = text if len(text) <= 200 else text[:197] + "..."
    return '"' + text.replace('"', '\\"') + '"'


def _dig(value: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value
