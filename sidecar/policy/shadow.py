"""``policy.shadow``: a candidate policy evaluated beside the live one on real traffic, never enforced.

After the live policy decided a call (and whatever it decided is enforced as usual), the same input is
submitted to the candidate, evaluated in its own embedded engine off the request path (a task on the
event loop, the evaluation on the engine's own thread). A different outcome is audited
(``policy.shadow``: decision id, both outcomes, both revisions, the rules that explain it) and counted;
nothing the candidate says ever reaches the call. ``agent_sidecar_policy_shadow_total{result}``:
``same``, ``differs``, ``error`` (the candidate gave no valid decision), ``dropped`` (more than
``max_pending`` candidate evaluations waiting: the shadow sheds load, the live path never waits for it).

The candidate costs an evaluation per call on the same cores: turn it on for a rollout, not for good.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from ..documents import Decision
from .embedded import EmbeddedEngine
from .engine import PolicyError
from .replay import rule_change, outcome_of

log = logging.getLogger("sidecar.policy")

SHADOW_RESULTS = ("same", "differs", "error", "dropped")


class ShadowPolicy:
    def __init__(self, candidate: Path, *, decision_path: str, timeout_seconds: float, name: str = "shadow",
                 public_key: bytes | None = None, max_pending: int = 64) -> None:
        from .bundle import read_policy

        policy, self.revision = read_policy(candidate, public_key=public_key, verify=False)
        self.name = name
        self.origin = str(candidate)
        self._engine = EmbeddedEngine(policy, decision_path=decision_path, provenance={name: self.revision})
        self._decision_path = decision_path
        self._timeout = timeout_seconds
        self._max_pending = max_pending
        self._pending: set[asyncio.Task[None]] = set()
        self._audit: Any = None
        self._results: Counter | None = None

    def attach(self, *, audit: Any = None, registry: CollectorRegistry | None = None) -> None:
        self._audit = audit
        if registry is not None:
            self._results = Counter("agent_sidecar_policy_shadow", "Shadow (candidate) policy evaluations by result.",
                                    ["result"], registry=registry)
            for result in SHADOW_RESULTS:
                self._results.labels(result)

    def submit(self, input_document: dict[str, Any], decision: Decision) -> None:
        """Called by the Decider once the live decision is made; returns at once."""
        if len(self._pending) >= self._max_pending:
            self._count("dropped")
            return
        task = asyncio.get_running_loop().create_task(self._compare(input_document, decision))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _compare(self, input_document: dict[str, Any], decision: Decision) -> None:
        try:
            result = await asyncio.wait_for(self._engine.evaluate(self._decision_path, input_document), self._timeout)
        except (PolicyError, asyncio.TimeoutError):
            result = None
        live, shadow = decision.outcome, outcome_of(result)
        if shadow in ("error", "invalid"):
            self._count("error")
        elif shadow == live:
            self._count("same")
            return
        else:
            self._count("differs")
        event: dict[str, Any] = {
            "type": "policy.shadow", "decision_id": decision.decision_id, "live": live, "shadow": shadow,
            "bundles": {name: {"revision": revision} for name, revision in decision.bundles.items()},
            "shadow_bundle": {self.name: {"revision": self.revision}}, "rules": rule_change(decision.result, result),
            "shadow_reasons": list(result.get("reasons", []))[:20] if isinstance(result, dict) else [],
            "route": _dig(input_document, "tool", "route"), "task_id": _dig(input_document, "task", "id"),
        }
        if self._audit is not None:
            try:
                self._audit.append(event, receipt=False)
            except Exception:  # noqa: BLE001 - AuditError: counted by the sink; a shadow never affects a call
                log.warning("audit log cannot be written: policy.shadow for %s not recorded", decision.decision_id)

    def _count(self, result: str) -> None:
        if self._results is not None:
            self._results.labels(result).inc()

    async def drain(self) -> None:
        """Wait for the candidate evaluations under way (tests, shutdown)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    async def run(self) -> None:
        """A background task that only closes the candidate's engine when the sidecar stops (it is cancelled)."""
        try:
            await asyncio.Event().wait()
        finally:
            for task in list(self._pending):
                task.cancel()
            self._engine.close_now()


def _dig(document: dict[str, Any], *keys: str) -> Any:
    value: Any = document
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value
