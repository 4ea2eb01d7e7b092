"""Shared parts of the concurrency tests: an upstream that holds calls at a gate, deployments of one
sidecar (SQLite) or two sidecars sharing one redis-server, a policy with tuned thresholds, audit reading."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web

from approvals_support import eventually
from harness import SHIPPED_POLICY, RunningSidecar, free_port, sidecar_config, start_sidecar


@dataclass
class Arrival:
    method: str
    path: str
    decision_id: str | None


@dataclass
class GateTool:
    """An upstream on loopback that records every call; calls under /gate wait until the gate opens."""

    port: int = 0
    arrivals: list[Arrival] = field(default_factory=list)
    runner: web.AppRunner | None = None
    gate: Any = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        import asyncio

        self.gate = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self.runner.setup()
        self.port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.arrivals.append(Arrival(request.method, request.path, request.headers.get("X-Agent-Decision")))
        if request.path.startswith("/gate"):
            await self.gate.wait()
        return web.json_response({"ok": True, "path": request.path})

    def at_gate(self) -> list[Arrival]:
        return [a for a in self.arrivals if a.path.startswith("/gate")]

    async def wait_at_gate(self, count: int) -> list[Arrival]:
        async def probe() -> list[Arrival] | None:
            waiting = self.at_gate()
            return waiting if len(waiting) >= count else None
        return await eventually(probe, deadline=30, what=f"{count} calls at the upstream's gate")

    async def stop(self) -> None:
        self.gate.set()
        if self.runner:
            await self.runner.cleanup()


def routes(upstream: str, *, gate_timeout_seconds: float = 30.0) -> list[dict[str, Any]]:
    crm_labels = {"environment": "dev", "data_classification": "confidential"}
    pay_labels = {"environment": "prod", "reversible": False}
    return [
        {"name": "crm", "match": {"path_prefix": "/crm"}, "upstream": f"{upstream}/crm", "labels": crm_labels},
        {"name": "payments", "match": {"path_prefix": "/payments"}, "upstream": f"{upstream}/payments",
         "labels": pay_labels},
        {"name": "hooks", "match": {"path_prefix": "/hooks"}, "upstream": f"{upstream}/hooks"},
        {"name": "slowcrm", "match": {"path_prefix": "/slowcrm"}, "upstream": f"{upstream}/gate/crm", "labels": crm_labels,
         "timeout_seconds": gate_timeout_seconds},
        {"name": "slowpay", "match": {"path_prefix": "/slowpay"}, "upstream": f"{upstream}/gate/payments",
         "labels": pay_labels, "timeout_seconds": gate_timeout_seconds},
    ]


def tuned_policy(directory: Path, anomalies: dict[str, Any] | None = None, **config: Any) -> Path:
    """The shipped rego/ library with some thresholds changed through its data, as an operator would."""
    target = directory / "rego"
    if not target.exists():
        shutil.copytree(SHIPPED_POLICY, target)
    data_path = target / "data.json"
    data = json.loads(data_path.read_text())
    data["sidecar"]["config"]["anomalies"].update(anomalies or {})
    data["sidecar"]["config"].update(config)
    data_path.write_text(json.dumps(data))
    return target


# Loopback stands for the outside world: an unlabelled route on 127.0.0.1 is an external destination to the
# policy, so a write to it is held only by the exfiltration chain (a route labelled external is always held).
LOOPBACK_IS_EXTERNAL = {"internal_cidrs": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]}


def policy_section(rego_dir: Path) -> dict[str, Any]:
    return {"engine": "embedded", "rego_dir": str(rego_dir), "timeout_ms": 5000}


def deployment_config(directory: Path, upstream: str, rego_dir: Path, redis_url: str | None, *,
                      gate_timeout_seconds: float = 30.0, **overrides: Any) -> dict[str, Any]:
    directory.mkdir(parents=True, exist_ok=True)
    config = sidecar_config(directory, upstream, policy=policy_section(rego_dir),
                            routes=routes(upstream, gate_timeout_seconds=gate_timeout_seconds), **overrides)
    if redis_url is not None:
        config["store"] = {"backend": "redis", "redis_url": redis_url}
    return config


@dataclass
class Deployment:
    """One sidecar on SQLite, or two sidecars sharing one redis-server; calls are spread over them."""

    sidecars: list[RunningSidecar]

    def proxy(self, n: int = 0) -> str:
        return self.sidecars[n % len(self.sidecars)].proxy

    @property
    def admin(self) -> str:
        return self.sidecars[0].admin

    def audit_events(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for running in self.sidecars:
            if running.audit_path.exists():
                events += [json.loads(line) for line in running.audit_path.read_text().splitlines() if line.strip()]
        return events

    async def stop(self) -> None:
        for running in self.sidecars:
            await running.sidecar.stop()


async def deploy(backend: str, directory: Path, upstream: str, rego_dir: Path, redis_url: str | None,
                 extra_routes: list[dict[str, Any]] | None = None) -> Deployment:
    """One sidecar on SQLite, or two replicas sharing Redis; ``extra_routes`` after the deployment's own."""
    replicas = 2 if backend == "redis" else 1
    started = []
    for n in range(replicas):
        config = deployment_config(directory / f"replica-{n}", upstream, rego_dir, redis_url if backend == "redis" else None)
        config["routes"] = [*config["routes"], *(extra_routes or [])]
        started.append(await start_sidecar(directory / f"replica-{n}", config))
    return Deployment(started)


async def task_history(admin: str, task_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{admin}/v1/tasks/{task_id}")
    assert response.status_code == 200, response.text
    history: dict[str, Any] = response.json()["history"]
    return history
