"""Step 3, decide: one query to the engine, a deadline, and strict validation.

An undefined decision, an engine error, a timeout or a result of the wrong
shape all become a ``policy_unavailable`` refusal: nothing is forwarded on doubt.
An engine too far behind to answer before the deadline refuses at once; that is
an ``overloaded`` refusal, since nothing is wrong with the policy or the engine.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any, Callable, Protocol

import fastjsonschema

if TYPE_CHECKING:
    from jsonschema import Draft202012Validator

from ..documents import ApprovalSpec, CredentialSpec, Decision
from ..ids import random_uuid
from ..problems import Refusal
from .engine import PolicyEngine, PolicyError


@lru_cache(maxsize=None)
def load_schema(name: str) -> dict[str, Any]:
    """A contract schema kept in sidecar/policy/schemas, e.g. ``decision.v1``."""
    text = resources.files("sidecar.policy").joinpath(f"schemas/{name}.json").read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


@lru_cache(maxsize=None)
def validator(name: str) -> Draft202012Validator:
    # Imported here: only an explanation needs it, and it costs a few MiB of every sidecar's memory.
    from jsonschema import Draft202012Validator

    schema = load_schema(name)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


@lru_cache(maxsize=None)
def fast_check(name: str) -> Callable[[Any], Any]:
    """The same schema compiled to Python code: ~3 µs a decision instead of ~80 µs on the hot path."""
    return fastjsonschema.compile(load_schema(name))


def decision_errors(result: Any) -> list[str]:
    """Every way a result breaks the decision contract, as short messages (empty when it conforms)."""
    try:
        fast_check("decision.v1")(result)
        return []
    except fastjsonschema.JsonSchemaException:
        pass  # explain every violation, with the full validator, on this cold path
    errors = []
    for error in sorted(validator("decision.v1").iter_errors(result), key=lambda e: list(e.absolute_path)):
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        errors.append(f"{where}: {error.message[:200]}")
    return errors


def to_decision(decision_id: str, result: dict[str, Any], eval_ns: int,
                bundles: Mapping[str, str] | None = None) -> Decision:
    credential = result.get("credential", {})
    approval = result.get("approval", {})
    return Decision(
        decision_id=decision_id,
        allow=result["allow"],
        require_approval=result.get("require_approval", False),
        reasons=tuple(result["reasons"]),
        risk=result.get("risk", "low"),
        credential=CredentialSpec(
            audience=credential.get("audience"),
            scopes=tuple(credential.get("scopes", ())),
            ttl_seconds=credential.get("ttl_seconds"),
        ),
        approval=ApprovalSpec(
            approvers=approval.get("approvers", 1),
            group=approval.get("group"),
            expires_in_seconds=approval.get("expires_in_seconds", 900),
        ),
        obligations=tuple(result.get("obligations", ())),
        rules=tuple(result.get("rules", ())),
        measures=dict(result.get("measures", {})),
        result=result,
        eval_ns=eval_ns,
        bundles=dict(bundles or {}),
    )


class ShadowSink(Protocol):
    """A candidate policy evaluated beside the live one (sidecar.policy.shadow)."""

    def submit(self, input_document: dict[str, Any], decision: Decision) -> None: ...


class Decider:
    def __init__(self, engine: PolicyEngine, decision_path: str, timeout_ms: int) -> None:
        self.engine = engine
        self.decision_path = decision_path
        self.timeout_seconds = timeout_ms / 1000.0
        self.shadow: ShadowSink | None = None

    async def decide(self, input_document: dict[str, Any], decision_id: str | None = None) -> Decision:
        """Return a validated decision or raise a policy_unavailable (or overloaded) Refusal."""
        decision_id = decision_id or random_uuid()
        started = time.perf_counter_ns()
        try:
            # asyncio.timeout, not wait_for: the evaluation runs in this task (wait_for would make one per call).
            async with asyncio.timeout(self.timeout_seconds):
                evaluation = await self.engine.evaluate_with_provenance(self.decision_path, input_document)
        except TimeoutError:
            raise self._refuse(decision_id, "timeout", f"policy engine timed out after {self.timeout_seconds * 1000:.0f} ms") from None
        except PolicyError as exc:
            if exc.kind == "overloaded":  # the engine is healthy, only behind: not a policy failure
                raise Refusal("overloaded", f"policy engine busy: {exc.message}", decision_id=decision_id,
                              headers={"Retry-After": "1"}) from None
            raise self._refuse(decision_id, exc.kind, f"policy engine {exc.kind}: {exc.message}") from None
        eval_ns = time.perf_counter_ns() - started
        result = evaluation.result
        errors = decision_errors(result)
        if errors:
            raise self._refuse(decision_id, "malformed", "policy decision does not match decision.v1: " + "; ".join(errors[:5]))
        decision = to_decision(decision_id, result, eval_ns, evaluation.bundles)
        if self.shadow is not None:
            self.shadow.submit(input_document, decision)  # off the request path; never changes this decision
        return decision

    @staticmethod
    def _refuse(decision_id: str, kind: str, detail: str) -> Refusal:
        return Refusal("policy_unavailable", detail, reasons=[detail], decision_id=decision_id, extra={"policy_error": kind})
