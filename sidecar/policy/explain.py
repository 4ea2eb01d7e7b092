"""``agent-sidecar policy eval``: one decision and its explanation, without running the proxy.

The explanation is what a security engineer asks of a decision: the outcome, the risk,
each rule that fired with its reason, the credential that would be minted, what an
approval needs, the obligations, and every way either document breaks its contract.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from ..context import INPUT_VERSION
from .decide import decision_errors, validator
from .engine import PolicyError
from .loader import PolicyLoadError

# Every input contract version there has been (a schema each in sidecar/policy/schemas).
INPUT_VERSIONS = ("v1", "v2")

OUTCOME_WORDS = {
    "allow": "allow: a credential is minted for this one call and it is forwarded",
    "hold": "hold: not forwarded until a human approves this exact request",
    "deny": "deny: refused with code denied",
    "invalid": "invalid: the result breaks the decision contract; the sidecar would refuse the call (policy_unavailable)",
}


@dataclass(frozen=True)
class Finding:
    rule: str
    reason: str


@dataclass(frozen=True)
class Explanation:
    outcome: str  # allow | hold | deny | invalid
    risk: str
    findings: tuple[Finding, ...]
    rules: tuple[str, ...]
    credential: dict[str, Any]
    approval: dict[str, Any]
    obligations: tuple[str, ...]
    decision_errors: tuple[str, ...]
    input_errors: tuple[str, ...]

    @property
    def contract_ok(self) -> bool:
        return not self.decision_errors and not self.input_errors


def input_errors(document: Any) -> list[str]:
    """Every way an input breaks the input contract this sidecar sends (input v2): it never sends such a document.
    A v1 document (recorded by an older sidecar) is named as such rather than listed field by field."""
    version = document.get("version") if isinstance(document, dict) else None
    if version != INPUT_VERSION and isinstance(version, str) and version in INPUT_VERSIONS:
        return [f"version: an input {version} document; this sidecar sends input {INPUT_VERSION} "
                f"(docs/policy.md, 'Input v1 and v2'), and a policy for {INPUT_VERSION} denies it as malformed_input"]
    found = sorted(validator(f"input.{INPUT_VERSION}").iter_errors(document), key=lambda e: list(e.absolute_path))
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message[:200]}" for e in found]


def explain(document: Any, result: Any) -> Explanation:
    errors = decision_errors(result)
    decision = _dict(result)
    rules = tuple(r for r in _list(decision.get("rules")) if isinstance(r, str))
    return Explanation(
        outcome="invalid" if errors else _outcome(decision),
        risk=str(decision.get("risk", "low")),
        findings=tuple(_finding(str(reason), rules) for reason in _list(decision.get("reasons"))),
        rules=rules,
        credential=_dict(decision.get("credential")),
        approval=_dict(decision.get("approval")),
        obligations=tuple(str(o) for o in _list(decision.get("obligations"))),
        decision_errors=tuple(errors),
        input_errors=tuple(input_errors(document)),
    )


def _dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else []


def _outcome(decision: dict[str, Any]) -> str:
    if decision.get("require_approval") is True:
        return "hold"
    return "allow" if decision.get("allow") is True else "deny"


def _finding(reason: str, rules: tuple[str, ...]) -> Finding:
    """The library starts every reason with its rule's name; other policies may not."""
    prefix = reason.split(":", 1)[0].strip()
    return Finding(prefix if prefix in rules else "-", reason)


def render(explanation: Explanation) -> str:
    lines = [f"outcome: {OUTCOME_WORDS[explanation.outcome]}", f"risk: {explanation.risk}", "rules fired:"]
    lines += [f"  - {f.rule}: {f.reason.removeprefix(f.rule + ':').strip()}" if f.rule != "-" else f"  - {f.reason}"
              for f in explanation.findings] or ["  (no reasons given)"]
    silent = [r for r in explanation.rules if r not in {f.rule for f in explanation.findings}]
    if silent:
        lines.append(f"  also fired, without a reason: {', '.join(silent)}")
    lines.append("credential: " + _credential_line(explanation))
    lines.append("approval: " + _approval_line(explanation))
    lines.append("obligations: " + (", ".join(explanation.obligations) or "none"))
    lines.append("contract errors:" + ("" if not explanation.contract_ok else " none"))
    lines += [f"  - decision {e}" for e in explanation.decision_errors]
    lines += [f"  - input {e}" for e in explanation.input_errors]
    return "\n".join(lines) + "\n"


def _credential_line(explanation: Explanation) -> str:
    credential = explanation.credential
    scopes = " ".join(str(s) for s in credential.get("scopes", []) or []) or "(none)"
    ttl = credential.get("ttl_seconds")
    text = (f"audience {credential.get('audience', '(the route name)')}, scopes {scopes}, "
            f"ttl {f'{ttl} s' if ttl is not None else '(the sidecar default)'}")
    return text if explanation.outcome == "allow" else text + " (minted only once the call is allowed)"


def _approval_line(explanation: Explanation) -> str:
    approval = explanation.approval
    expiry = approval.get("expires_in_seconds")
    text = (f"{approval.get('approvers', 1)} distinct approver(s) from group {approval.get('group') or '(any)'}, "
            f"expires in {f'{expiry} s' if expiry is not None else 'the sidecar default'}")
    return text if explanation.outcome == "hold" else f"not needed ({text} if held)"


def read_input(path: Path) -> Any:
    """The input document, bare or wrapped as OPA's ``{"input": ...}``; ValueError/OSError when unreadable."""
    document: Any = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(document, dict) and set(document) == {"input"}:
        document = document["input"]
    return document


def run_eval(input_path: Path, rego_dir: Path, decision_path: str, *, as_json: bool = False,
             out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Exit status: 0 a valid decision for a valid input, 1 a contract error or engine error, 2 unreadable files."""
    from .embedded import EmbeddedEngine

    try:
        document = read_input(input_path)
    except (OSError, ValueError) as exc:
        print(f"agent-sidecar: {input_path}: cannot read JSON input ({exc})", file=err)
        return 2
    try:
        engine = EmbeddedEngine(rego_dir, decision_path=decision_path)
    except PolicyLoadError as exc:
        print(f"agent-sidecar: {exc}", file=err)
        return 2
    try:
        result = engine.evaluate_sync(decision_path, document)
    except PolicyError as exc:
        print(f"agent-sidecar: policy engine {exc.kind}: {exc.message}", file=err)
        return 1
    explanation = explain(document, result)
    if as_json:
        out.write(json.dumps({"decision": result, "explanation": asdict(explanation),
                              "contract_errors": list(explanation.decision_errors),
                              "input_errors": list(explanation.input_errors)}, indent=2, sort_keys=True) + "\n")
    else:
        out.write(render(explanation))
    return 0 if explanation.contract_ok else 1
