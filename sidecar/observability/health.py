"""The metrics listener (default 127.0.0.1:15090): /metrics, /healthz, /readyz.

Readiness is a set of named checks. Any part of the sidecar registers one with
``readiness.register("store", check)``; /readyz runs them all concurrently, each
under a deadline, and answers 503 with the names of the failing ones.

A check registered with ``fatal=False`` is shown (``"fatal": false``) but never makes the sidecar
unready: a failing one is listed under ``warnings``, not ``failing``. Example: ``policy_reload``, red
while the latest policy change is refused and the last good policy keeps deciding.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .metrics import Metrics

# A readiness check answers (ok, detail). The detail is shown on /readyz: never put a secret in it.
Check = Callable[[], Awaitable[tuple[bool, str]]]


class Readiness:
    """Named readiness checks; /readyz runs them all."""

    def __init__(self, timeout_seconds: float = 2.0) -> None:
        self.timeout_seconds = timeout_seconds
        self._checks: dict[str, Check] = {}
        self._not_fatal: set[str] = set()

    def register(self, name: str, check: Check, *, fatal: bool = True) -> None:
        if name in self._checks:
            raise ValueError(f"readiness check {name!r} is already registered")
        self._checks[name] = check
        if not fatal:
            self._not_fatal.add(name)

    @property
    def names(self) -> list[str]:
        return list(self._checks)

    async def run(self) -> dict[str, Any]:
        names = list(self._checks)
        outcomes = await asyncio.gather(*(self._run_one(self._checks[name]) for name in names))
        results: dict[str, dict[str, Any]] = {
            name: {"ok": ok, "detail": detail} for name, (ok, detail) in zip(names, outcomes, strict=True)}
        for name in self._not_fatal:
            results[name]["fatal"] = False
        failing = [name for name, result in results.items() if not result["ok"] and name not in self._not_fatal]
        report: dict[str, Any] = {"ready": not failing, "failing": failing, "checks": results}
        warnings = [name for name, result in results.items() if not result["ok"] and name in self._not_fatal]
        if warnings:
            report["warnings"] = warnings
        return report

    async def _run_one(self, check: Check) -> tuple[bool, str]:
        try:
            ok, detail = await asyncio.wait_for(check(), self.timeout_seconds)
        except asyncio.TimeoutError:
            return False, f"no answer within {self.timeout_seconds:g}s"
        except Exception as exc:  # noqa: BLE001 - a failing check is a red check, never a crash
            return False, f"check failed ({type(exc).__name__})"
        return bool(ok), str(detail)


READINESS = web.AppKey("readiness", Readiness)


def build_metrics_app(metrics: Metrics, checks: Readiness | dict[str, Check]) -> web.Application:
    readiness = checks if isinstance(checks, Readiness) else _from_dict(checks)
    app = web.Application()
    app[READINESS] = readiness  # others register checks: app[READINESS].register(name, check)

    async def scrape(request: web.Request) -> web.Response:
        body = await asyncio.to_thread(generate_latest, metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(request: web.Request) -> web.Response:
        report = await readiness.run()
        return web.json_response(report, status=200 if report["ready"] else 503)

    app.router.add_get("/metrics", scrape)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


def _from_dict(checks: dict[str, Check]) -> Readiness:
    readiness = Readiness()
    for name, check in checks.items():
        readiness.register(name, check)
    return readiness
