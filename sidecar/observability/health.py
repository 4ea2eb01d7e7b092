"""The metrics listener (default 127.0.0.1:15090): /metrics, /healthz, /readyz."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .metrics import Metrics

# A readiness check answers (ok, detail).
Check = Callable[[], Awaitable[tuple[bool, str]]]


def build_metrics_app(metrics: Metrics, checks: dict[str, Check]) -> web.Application:
    app = web.Application()

    async def scrape(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(request: web.Request) -> web.Response:
        results = {}
        for name, check in checks.items():
            try:
                ok, detail = await check()
            except Exception as exc:  # noqa: BLE001 - a failing check is a red check, never a crash
                ok, detail = False, f"{type(exc).__name__}"
            results[name] = {"ok": ok, "detail": detail}
        ready = all(r["ok"] for r in results.values())
        failing = [name for name, r in results.items() if not r["ok"]]
        return web.json_response({"ready": ready, "failing": failing, "checks": results}, status=200 if ready else 503)

    app.router.add_get("/metrics", scrape)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
