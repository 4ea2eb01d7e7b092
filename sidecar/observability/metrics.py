"""Prometheus metrics on their own registry. Labels carry bounded values only (route names, outcomes)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Embedded evaluations take tens to hundreds of microseconds: resolve below a millisecond.
DECISION_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# The bounded label values (docs/observability.md lists them).
OUTCOMES = ("allowed", "denied", "approval_required", "refused", "error")
POLICY_ERROR_KINDS = ("timeout", "unreachable", "error", "undefined", "malformed")
REVOCATION_CAUSES = ("completed", "revoked", "expired", "obligation")
APPROVAL_OUTCOMES = ("approved", "denied", "used", "expired")
RECORDS = ("task_history", "reservation")  # what a record.failed names
UPSTREAM_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class RouteMetrics:
    """One route's children of the per-call metrics, looked up once: ``labels()`` costs a lock and a few µs."""

    allowed: Counter
    upstream_seconds: Histogram
    credentials_minted: Counter


class SparingEngine(Protocol):
    """An engine that stands spare engines in for evaluations that overran (sidecar.policy.embedded)."""

    @property
    def spare_engines(self) -> int: ...

    @property
    def overruns(self) -> int: ...

    @property
    def spares_in_use(self) -> int: ...


class _EngineSpares(Collector):
    """Read from the engine at scrape time: the engine keeps plain counts on its event loop."""

    def __init__(self, engine: SparingEngine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily("agent_sidecar_policy_overruns", "Evaluations that outlived their call's deadline.",
                                  value=self._engine.overruns)
        yield GaugeMetricFamily("agent_sidecar_policy_spare_engines", "Spare engines standing in for an overrunning one.",
                                value=self._engine.spares_in_use)
        yield GaugeMetricFamily("agent_sidecar_policy_spare_engines_max", "Spare engines configured.",
                                value=self._engine.spare_engines)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._routes: dict[str, RouteMetrics] = {}
        self._decision_seconds: dict[str, Histogram] = {}
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("agent_sidecar_requests", "Intercepted calls by route and outcome.",
                                ["route", "outcome"], registry=r)
        self.refusals = Counter("agent_sidecar_refusals", "Refused calls by problem code.", ["code"], registry=r)
        self.decision_seconds = Histogram("agent_sidecar_decision_duration_seconds",
                                          "Policy evaluation latency.", ["engine"], buckets=DECISION_BUCKETS, registry=r)
        self.upstream_seconds = Histogram("agent_sidecar_upstream_duration_seconds",
                                          "Upstream latency to response headers.", ["route"], buckets=UPSTREAM_BUCKETS, registry=r)
        self.policy_errors = Counter("agent_sidecar_policy_errors", "Policy engine failures by kind.",
                                     ["engine", "kind"], registry=r)
        self.credentials_minted = Counter("agent_sidecar_credentials_minted", "Credentials minted by route.",
                                          ["route"], registry=r)
        self.revocations = Counter("agent_sidecar_revocations", "Task credential revocations by cause.",
                                   ["cause"], registry=r)
        self.approvals_pending = Gauge("agent_sidecar_approvals_pending", "Approvals waiting for a human.", registry=r)
        self.approvals_resolved = Counter("agent_sidecar_approvals_resolved", "Approvals resolved by outcome.",
                                          ["outcome"], registry=r)
        self.audit_write_errors = Counter("agent_sidecar_audit_write_errors", "Audit events that could not be written.",
                                          registry=r)
        self.audit_events = Counter("agent_sidecar_audit_events", "Audit events written to the chain.", registry=r)
        self.audit_file_displaced = Counter("agent_sidecar_audit_file_displaced",
                                            "Audit files removed or replaced under the running sidecar.", ["kind"],
                                            registry=r)
        self.audit_queue = Gauge("agent_sidecar_audit_queue_events", "Audit events waiting for the writer thread.",
                                 registry=r)
        self.audit_queue_bytes = Gauge("agent_sidecar_audit_queue_bytes",
                                       "Bytes of policy input embedded in the audit events waiting (audit.queue_bytes).",
                                       registry=r)
        self.audit_shipped = Counter("agent_sidecar_audit_shipped_events", "Audit events accepted by the HTTP sink.",
                                     registry=r)
        self.audit_ship_failures = Counter("agent_sidecar_audit_ship_failures",
                                           "Audit uploads refused by the HTTP sink or not delivered.", registry=r)
        self.audit_ship_dropped = Counter("agent_sidecar_audit_ship_dropped_events",
                                          "Audit events dropped from the full shipping queue.", registry=r)
        self.audit_ship_queue = Gauge("agent_sidecar_audit_ship_queue_events", "Audit events waiting to be shipped.",
                                      registry=r)
        self.audit_ship_queue_bytes = Gauge("agent_sidecar_audit_ship_queue_bytes",
                                            "Bytes of policy input embedded in the audit events waiting to be shipped "
                                            "(audit.ship.queue_bytes).", registry=r)
        self.record_failures = Counter("agent_sidecar_record_failures",
                                       "Records of decided or forwarded calls that the store could not take at once "
                                       "(queued and retried), by record.", ["record"], registry=r)
        self.record_backlog = Gauge("agent_sidecar_record_backlog", "Records of forwarded calls waiting for the store.",
                                    registry=r)
        self.record_dropped = Counter("agent_sidecar_record_dropped",
                                      "Records dropped from the full background retry queue.", registry=r)
        self.task_decision_conflicts = Counter("agent_sidecar_task_decision_conflicts",
                                               "Decisions made again because the task's history changed meanwhile.",
                                               registry=r)

    def watch_spares(self, engine: SparingEngine) -> None:
        self.registry.register(_EngineSpares(engine))

    def route(self, name: str) -> RouteMetrics:
        found = self._routes.get(name)
        if found is None:
            found = self._routes[name] = RouteMetrics(self.requests.labels(name, "allowed"), self.upstream_seconds.labels(name),
                                                      self.credentials_minted.labels(name))
        return found

    def decision_timer(self, engine: str) -> Histogram:
        found = self._decision_seconds.get(engine)
        if found is None:
            found = self._decision_seconds[engine] = self.decision_seconds.labels(engine)
        return found

    def prime(self, routes: list[str], engine: str) -> None:
        """Create every bounded label combination at zero, so rates and alerts work before the first event."""
        from ..problems import PROBLEMS

        for route in [*routes, "none"]:
            for outcome in OUTCOMES:
                self.requests.labels(route, outcome)
        for route in routes:
            self.credentials_minted.labels(route)
            self.upstream_seconds.labels(route)
        for code in PROBLEMS:
            self.refusals.labels(code)
        for kind in POLICY_ERROR_KINDS:
            self.policy_errors.labels(engine, kind)
        self.decision_seconds.labels(engine)
        for cause in REVOCATION_CAUSES:
            self.revocations.labels(cause)
        for outcome in APPROVAL_OUTCOMES:
            self.approvals_resolved.labels(outcome)
        for what in ("removed", "replaced"):
            self.audit_file_displaced.labels(what)
        for record in RECORDS:
            self.record_failures.labels(record)
