"""Wiring: build every part from the config, then open the three listeners."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from aiohttp import web

from .admin.credentials_api import CredentialsApi, TaskEnded
from .admin.server import build_admin_app
from .approvals.wiring import build_approvals
from .audit import AuditError
from .audit.wiring import build_audit
from .config import Config, ConfigError, Route, RouteMatch
from .context import AgentIdentity, build_input
from .credentials import CredentialMinter, JwtMinter, KeyRing, NoCredentialMinter, generate_key
from .credentials.keys import KeyError_
from .credentials.minter import StaticKeyMinter
from .credentials.wiring import build_credential_parts
from .lane import WorkerLane
from .documents import InterceptedCall
from .observability.health import build_metrics_app
from .observability.metrics import Metrics
from .pipeline import RequestPath
from .policy import Decider, PolicyEngine
from .policy.embedded import EmbeddedEngine
from .policy.live import LivePolicy
from .policy.wiring import reload_on_sighup, wire_policy
from .problems import Refusal
from .proxy.forward import HttpForwarder
from .proxy.intercept import Interceptor
from .proxy.listener import GuardedServer
from .proxy.tls import LeafIssuer, ca_pem_handler, host_of
from .proxy.routing import RouteTable
from .tasks import Task
from .tls_ca import CaError, development_ca, load_ca

log = logging.getLogger("sidecar")


def build_engine(config: Config) -> PolicyEngine:
    if config.policy.engine == "rest":
        from .policy.rest import RestEngine

        return RestEngine(config.policy.rest_url, timeout_seconds=config.policy.timeout_ms / 1000)
    from .policy.embedded import opa_available
    from .policy.wiring import build_live_policy

    if not opa_available():
        raise ConfigError(f"{config.source.name}: policy.engine: embedded engine (opa_bindings) is not installed here; use engine: rest")
    return build_live_policy(config)  # the embedded engine, following its policy source (issue 19)


def load_keys(config: Config) -> KeyRing:
    directory = config.credentials.keys_dir
    if directory is None:
        # Local runs only: a development key generated into the state folder, never committed.
        directory = config.state_dir / "dev-keys"
        if not (directory.is_dir() and any(directory.glob("*.pem"))):
            generate_key(directory, config.credentials.algorithm)
    try:
        return KeyRing(directory)
    except KeyError_ as exc:
        raise ConfigError(f"{config.source.name}: credentials.keys_dir: {exc}") from None


def build_minter(route: Route, keys: KeyRing, config: Config) -> CredentialMinter:
    if route.credential.mode == "none":
        return NoCredentialMinter()
    if route.credential.mode == "static":
        assert route.credential.static_key_file is not None
        return StaticKeyMinter(route.credential.static_key_file)
    return JwtMinter(keys, issuer=config.credentials.issuer, max_ttl_seconds=config.credentials.max_ttl_seconds,
                     default_ttl_seconds=config.credentials.default_ttl_seconds)


PROBE_ROUTE = Route(name="readiness-probe", match=RouteMatch(path_prefix="/probe"), upstream="http://probe.invalid")


def probe_input() -> dict[str, Any]:
    """A fixed, harmless input that every policy must answer with a well-formed decision."""
    call = InterceptedCall(route=PROBE_ROUTE, mode="route_prefix", method="GET", scheme="http", host="probe.invalid",
                           port=80, path="/", query_string="", query={}, headers=(), body=b"", body_json=None,
                           body_sha256="e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", content_type="")
    return build_input(call, AgentIdentity("spiffe://probe/readiness", False), None)


@dataclass
class Sidecar:
    config: Config
    path: RequestPath
    admin_app: web.Application
    metrics_app: web.Application
    runners: list[web.BaseRunner] = field(default_factory=list)
    startup: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    background: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)
    _running: list[asyncio.Task[None]] = field(default_factory=list)
    tls: LeafIssuer | None = None  # TLS interception (issue 18): None when no route intercepts
    disk: WorkerLane | None = None  # the task store's and the audit writer's thread, stopped after both closed

    async def start(self) -> None:
        for prepare in self.startup:
            await prepare()
        self._running = [asyncio.create_task(run()) for run in self.background]
        # No access log: every call is in the audit chain already, and a log line per call costs ~6% CPU.
        if self.tls is not None:
            self.tls.on_refusal = self._listener_refusal  # refused TLS server names are counted and audited
        proxy = GuardedServer(self.path.handle, limits=self.config.connections, on_refusal=self._listener_refusal,
                              tls=self.tls, tls_handshake_timeout=self.config.tls_interception.handshake_timeout_seconds,
                              handler_cancellation=True, access_log=None)
        targets: list[tuple[web.BaseRunner, Any]] = [
            (web.ServerRunner(proxy, access_log=None), self.config.proxy),
            (web.AppRunner(self.admin_app, access_log=None), self.config.admin),
            (web.AppRunner(self.metrics_app, access_log=None), self.config.metrics),
        ]
        for runner, listen in targets:
            await runner.setup()
            self.runners.append(runner)
            await web.TCPSite(runner, listen.host, listen.port, reuse_address=True).start()
        log.info("proxy on %s, admin on %s, metrics on %s", self.config.proxy, self.config.admin, self.config.metrics)

    def _listener_refusal(self, refusal: Refusal) -> None:
        """A refusal made below the request path (the HTTP parser, a slow head, too many connections)."""
        self.path.metrics.refusals.labels(refusal.code).inc()
        self.path.metrics.requests.labels("none", "refused").inc()
        try:
            self.path.audit.append({"type": "refusal", "code": refusal.code, "detail": refusal.detail, "route": "none",
                                    "task_id": None, "approval_id": None}, receipt=False)
        except AuditError:
            pass  # counted by the sink; the connection is refused either way

    async def stop(self) -> None:
        for runner in reversed(self.runners):
            await runner.cleanup()
        self.runners.clear()
        await self.path.drain()  # calls being forwarded and recorded finish (bounded) before the stores close
        for running in self._running:
            running.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
        self._running.clear()
        await self.path.tasks.close()
        await self.path.forwarder.close()
        await self.path.decider.engine.close()
        if self.path.hold.notifier is not None:
            await self.path.hold.notifier.close()
        await self.path.approvals.close()
        await asyncio.to_thread(self.path.audit.close)  # flushes the queue: off the loop
        if self.disk is not None:
            self.disk.stop()


def build_sidecar(config: Config) -> Sidecar:
    """Everything that can fail on bad config fails here, before a listener opens."""
    config.state_dir.mkdir(parents=True, exist_ok=True)
    engine = build_engine(config)
    keys = load_keys(config)
    tls = build_tls(config)
    metrics = Metrics()
    # One thread for the disk: the task store's commits and the audit chain's writes take turns on it.
    disk = WorkerLane("disk-writer")
    credential_parts = build_credential_parts(config, keys, disk)
    tasks = credential_parts.tasks
    audit_parts = build_audit(config, metrics, disk)
    audit = audit_parts.writer
    metrics.prime([route.name for route in config.routes], engine.name)
    if isinstance(engine, (EmbeddedEngine, LivePolicy)):
        metrics.watch_spares(engine)
    approvals = build_approvals(config, metrics, audit)
    identity = credential_parts.identity
    decider = Decider(engine, config.policy.decision_path, config.policy.timeout_ms)
    path = RequestPath(
        interceptor=Interceptor(RouteTable(config.routes), config.max_body_bytes,
                                body_timeout_seconds=config.connections.body_timeout_seconds,
                                max_body_bytes_in_flight=config.max_body_bytes_in_flight),
        identity=identity,
        tasks=tasks,
        decider=decider,
        approvals=approvals.store,
        minters={route.name: build_minter(route, keys, config) for route in config.routes},
        forwarder=HttpForwarder(config.routes),
        audit=audit,
        metrics=metrics,
        audit_fail_closed=config.audit.fail_closed,
        hold=approvals.hold,
        delegation=credential_parts.delegation,
        max_in_flight=config.max_in_flight,
    )

    async def policy_ready() -> tuple[bool, str]:
        try:
            decision = await decider.decide(probe_input())
        except Refusal as refusal:
            return False, refusal.detail
        return True, f"{engine.name} engine answered ({decision.outcome})"

    admin_app = build_admin_app(keys=keys, tasks=tasks, approvals=approvals.store, identity=identity,
                                approval_desk=approvals.desk,
                                credentials_api=CredentialsApi(credential_parts.introspector, credential_parts.callers, tasks,
                                                               lambda: identity.current().id,
                                                               on_task_ended=task_ended(path), audit=audit))
    metrics_app = build_metrics_app(metrics, {"policy": policy_ready, "audit": audit_parts.ready,
                                              "approval_store": approvals.store.ping,
                                              "task_history": path.backlog.ready,
                                              **credential_parts.checks})
    policy_background = wire_policy(config, engine, decider, audit=audit, metrics=metrics, admin_app=admin_app,
                                    metrics_app=metrics_app, identify=approvals.desk.identify)
    if tls is not None:
        admin_app.router.add_get("/ca.pem", ca_pem_handler(tls.ca.cert_pem))  # the certificate only, never the key
    return Sidecar(config, path, admin_app, metrics_app, startup=credential_parts.startup,
                   background=[*credential_parts.background, *audit_parts.background, path.backlog.run,
                               *policy_background], tls=tls, disk=disk)


def build_tls(config: Config) -> LeafIssuer | None:
    """The pod-local CA and its leaf issuer, when a route intercepts TLS or a CA is configured."""
    routes = [route for route in config.routes if route.intercept_tls]
    settings = config.tls_interception
    if not routes and settings.ca_cert is None:
        return None
    try:
        if settings.ca_cert is not None and settings.ca_key is not None:
            ca = load_ca(settings.ca_cert, settings.ca_key)
        else:
            ca = development_ca(config.state_dir)
    except CaError as exc:
        raise ConfigError(f"{config.source.name}: tls_interception: {exc}") from None
    return LeafIssuer(ca, frozenset(host_of(route) for route in routes), max_entries=settings.leaf_cache_size)


def task_ended(path: RequestPath) -> TaskEnded:
    """A task completed through the admin API (audited before it ended): its credentials are revoked; count it."""

    async def record(task: Task, cause: str) -> None:
        path.metrics.revocations.labels(cause).inc()

    return record


async def serve(config: Config) -> None:
    sidecar = build_sidecar(config)
    await sidecar.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reload_on_sighup(loop, sidecar.path.decider.engine)  # SIGHUP: a forced policy reload (docs/policy.md)
    try:
        await stop.wait()
    finally:
        await sidecar.stop()
