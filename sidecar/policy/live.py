"""The embedded engine behind a holder that swaps policies without dropping a call.

A change of the policy source is read, compiled into a new pool of engines (EmbeddedEngine, spare
engines and all) and checked, all on a thread, off the request path:

1. it compiles (every module, every data file),
2. the library's own data check passes (``config_errors``, see embedded.check_data_once),
3. its Rego tests (``test_*`` rules) pass, when the source carries any.

Only then is it swapped in, in one assignment on the event loop. Each call evaluates on the pool that
was current when it started and finishes there; a retired pool is closed by the last call that used it.
A change that fails any check is not loaded: the last good policy keeps deciding, and the refusal is
logged once, audited (``policy.reload``), counted (``agent_sidecar_policy_reload_total``) and shown
on /readyz as the non-fatal check ``policy_reload``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .embedded import EmbeddedEngine
from .engine import Evaluation
from .loader import PolicyLoadError
from .source import LoadedPolicy, PolicySource

log = logging.getLogger("sidecar.policy")

RELOAD_RESULTS = ("loaded", "refused")


@dataclass
class _Generation:
    engine: EmbeddedEngine
    policy: LoadedPolicy
    in_flight: int = 0
    retired: bool = False


@dataclass(frozen=True)
class ReloadResult:
    result: str  # loaded | refused | unchanged
    revision: str | None  # the candidate's (loaded or refused); None when it could not be read at all
    active_revision: str  # the revision deciding now
    error: str | None = None
    at: float = field(default_factory=time.time)

    def public(self) -> dict[str, Any]:
        return {"result": self.result, "revision": self.revision, "active_revision": self.active_revision,
                "error": self.error}


class LivePolicy:
    """A PolicyEngine (the embedded one) whose policy follows its source."""

    name = "embedded"

    def __init__(self, source: PolicySource, *, workers: int = 1, spare_engines: int = 0,
                 decision_path: str = "sidecar/authz/decision", queue_deadline_seconds: float | None = None,
                 reload_seconds: float = 1.0, run_policy_tests: bool = True) -> None:
        """Loads and checks the source's policy now; raises PolicyLoadError when it fails a check."""
        self._source = source
        self._workers = workers
        self._spare_engines = spare_engines
        self._decision_path = decision_path
        self._queue_deadline = queue_deadline_seconds
        self._run_policy_tests = run_policy_tests
        self.reload_seconds = reload_seconds
        policy = source.fetch(force=True)
        assert policy is not None
        # At start-up the policy is compiled and data-checked, as before; its Rego tests are a change's
        # gate (and CI's, ``agent-sidecar policy test``), so a restart is not slowed by running them.
        self._current = _Generation(self._build(policy, run_tests=False), policy)
        self._draining: list[_Generation] = []
        self._retired_overruns = 0
        self.last = ReloadResult("loaded", policy.revision, policy.revision)
        self._last_logged_failure: str | None = None
        self._lock: asyncio.Lock | None = None
        self._wake: asyncio.Event | None = None
        self._audit: Any = None
        self._reloads: Counter | None = None

    # ---------------------------------------------------------------- the engine protocol

    @property
    def policy(self) -> LoadedPolicy:
        return self._current.policy

    @property
    def revision(self) -> str:
        return self._current.policy.revision

    async def evaluate(self, path: str, input_document: dict[str, Any]) -> Any:
        return (await self.evaluate_with_provenance(path, input_document)).result

    async def evaluate_with_provenance(self, path: str, input_document: dict[str, Any]) -> Evaluation:
        generation = self._current  # the pool this call starts on is the pool it finishes on
        generation.in_flight += 1
        try:
            return await generation.engine.evaluate_with_provenance(path, input_document)
        finally:
            generation.in_flight -= 1
            if generation.retired and generation.in_flight == 0:
                self._close(generation)

    def evaluate_sync(self, path: str, input_document: dict[str, Any]) -> Any:
        return self._current.engine.evaluate_sync(path, input_document)

    async def close(self) -> None:
        for generation in [*self._draining, self._current]:
            generation.engine.close_now()
        self._draining.clear()

    # spare-engine figures for sidecar.observability.metrics (summed over pools still draining)

    @property
    def spare_engines(self) -> int:
        return self._spare_engines

    @property
    def overruns(self) -> int:
        return self._retired_overruns + sum(g.engine.overruns for g in [*self._draining, self._current])

    @property
    def spares_in_use(self) -> int:
        return sum(g.engine.spares_in_use for g in [*self._draining, self._current])

    @property
    def module_count(self) -> int:
        return self._current.engine.module_count

    @property
    def workers(self) -> int:
        return self._workers

    # ---------------------------------------------------------------- reloading

    def attach(self, *, audit: Any = None, registry: CollectorRegistry | None = None) -> None:
        """Where reloads are recorded: the audit chain, and the metrics registry."""
        self._audit = audit
        if registry is not None:
            self._reloads = Counter("agent_sidecar_policy_reload", "Policy reloads by result (loaded, refused).",
                                    ["result"], registry=registry)
            for result in RELOAD_RESULTS:
                self._reloads.labels(result)
            registry.register(_PolicyInfo(self))

    def request_reload(self) -> None:
        """Ask the watcher for a forced reload (SIGHUP); returns at once."""
        if self._wake is not None:
            self._wake.set()

    async def watch(self) -> None:
        """Poll the source every ``reload_seconds`` (0: only when asked); run as a background task."""
        self._wake = asyncio.Event()
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.reload_seconds if self.reload_seconds > 0 else None)
            except asyncio.TimeoutError:
                pass
            forced = self._wake.is_set()
            self._wake.clear()
            try:
                await self.reload(force=forced, cause="signal" if forced else "watch")
            except Exception:  # noqa: BLE001 - the watcher must outlive any one failure
                log.exception("policy reload failed unexpectedly; the current policy keeps deciding")

    async def reload(self, *, force: bool = True, cause: str = "api", by: str | None = None) -> ReloadResult:
        """Fetch, build and check the source's policy; swap it in if it passes. One reload at a time."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            previous = self.revision
            try:
                policy = await asyncio.to_thread(self._source.fetch, force=force)
                if policy is None:
                    return ReloadResult("unchanged", None, previous)
                if policy.revision == previous:  # the source serves what decides already (or went back to it)
                    if self.last.result == "refused":
                        log.info("policy source is back to revision %s, which keeps deciding", previous)
                    self.last = ReloadResult("unchanged", previous, previous)
                    self._last_logged_failure = None
                    return self.last
                engine = await asyncio.to_thread(self._build, policy)
            except PolicyLoadError as exc:
                return self._refused(exc, cause, by, previous)
            self._swap(engine, policy)
            self.last = ReloadResult("loaded", policy.revision, policy.revision)
            self._last_logged_failure = None
            log.info("policy %s revision %s loaded from %s (was %s)", policy.name, policy.revision, policy.origin, previous)
            self._record(self.last, cause, by, previous)
            return self.last

    def _build(self, policy: LoadedPolicy, *, run_tests: bool = True) -> EmbeddedEngine:
        """A new pool with the policy compiled and checked; blocking (a thread)."""
        try:
            engine = EmbeddedEngine(policy.bundle, workers=self._workers, spare_engines=self._spare_engines,
                                    decision_path=self._decision_path, queue_deadline_seconds=self._queue_deadline,
                                    provenance=policy.bundles)
        except PolicyLoadError as exc:
            exc.revision = policy.revision
            raise
        try:
            if run_tests:
                self._check_policy_tests(policy)
        except BaseException:
            engine.close_now()
            raise
        return engine

    def _check_policy_tests(self, policy: LoadedPolicy) -> None:
        from .testing import discover_tests, run_bundle_tests

        if not self._run_policy_tests or not discover_tests(policy.bundle.modules):
            return
        report = run_bundle_tests(policy.bundle, coverage=False)
        failed = [r.ref for r in report.results if not r.passed]
        if failed:
            shown = ", ".join(failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
            error = PolicyLoadError(policy.origin, f"{len(failed)} of {len(report.results)} Rego tests fail: {shown}")
            error.revision = policy.revision
            raise error

    def _swap(self, engine: EmbeddedEngine, policy: LoadedPolicy) -> None:
        old = self._current
        self._current = _Generation(engine, policy)
        old.retired = True
        if old.in_flight == 0:
            self._close(old)
        else:
            self._draining.append(old)

    def _close(self, generation: _Generation) -> None:
        if generation in self._draining:
            self._draining.remove(generation)
        self._retired_overruns += generation.engine.overruns
        generation.engine.close_now()

    def _refused(self, exc: PolicyLoadError, cause: str, by: str | None, previous: str) -> ReloadResult:
        message = str(exc)
        self.last = ReloadResult("refused", exc.revision, previous, message)
        repeated = message == self._last_logged_failure
        if not repeated:  # once per distinct failure: a bundle server down is not a new refusal every poll
            self._last_logged_failure = message
            log.error("policy change refused (revision %s): %s; revision %s keeps deciding",
                      exc.revision or "unknown", message, previous)
        if not repeated or cause in ("api", "signal"):  # asked for explicitly: always on the record
            self._record(self.last, cause, by, previous)
        return self.last

    def _record(self, result: ReloadResult, cause: str, by: str | None, previous: str) -> None:
        if self._reloads is not None:
            self._reloads.labels(result.result).inc()
        if self._audit is None:
            return
        event: dict[str, Any] = {"type": "policy.reload", "result": result.result, "cause": cause,
                                 "bundle": self.policy.name, "source": self._source.origin,
                                 "revision": result.revision, "previous_revision": previous,
                                 "active_revision": result.active_revision}
        if result.error is not None:
            event["error"] = result.error[:2000]
        if by is not None:
            event["by"] = by
        try:
            self._audit.append(event, receipt=False)
        except Exception:  # noqa: BLE001 - AuditError: counted by the sink; the reload stands either way
            log.error("audit log cannot be written: policy.reload %s not recorded", result.result)

    async def readiness(self) -> tuple[bool, str]:
        """The non-fatal /readyz check ``policy_reload``: red while the latest change is refused."""
        last = self.last
        if last.result == "refused":
            return False, (f"change {last.revision or '(unreadable)'} refused: {last.error}; "
                           f"revision {last.active_revision} keeps deciding")
        return True, f"{self.policy.name} revision {self.revision} from {self._source.origin}"


class _PolicyInfo(Collector):
    """``agent_sidecar_policy_info{bundle, revision} 1``: the revision deciding now (read at scrape time)."""

    def __init__(self, live: LivePolicy) -> None:
        self._live = live

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("agent_sidecar_policy_info", "The policy deciding now: bundle name and revision.",
                                 labels=["bundle", "revision"])
        policy = self._live.policy
        info.add_metric([policy.name, policy.revision], 1)
        yield info


def bundles_of(engine: Any) -> Mapping[str, str]:
    """The bundles an engine reports now (LivePolicy, EmbeddedEngine), or none."""
    policy = getattr(engine, "policy", None)
    return policy.bundles if isinstance(policy, LoadedPolicy) else {}
