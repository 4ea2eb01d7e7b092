"""`make run`: the sidecar on its embedded defaults, a demo tool, and a short demo a newcomer can follow.

Starts a demo upstream tool on 127.0.0.1:18080, the sidecar from examples/sidecar.yaml
(embedded OPA, rego/, state in .state/, a generated development key), plays one allowed,
one denied and one held call, then keeps serving so you can try curl yourself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
import jwt
from aiohttp import web

from .app import build_sidecar
from .config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = ROOT / "examples" / "sidecar.yaml"
TOOL_PORT = 18080


def demo_tool() -> web.Application:
    """An upstream tool that shows what reached it: the credential's claims, never the token itself."""

    async def handle(request: web.Request) -> web.Response:
        authorization = request.headers.get("Authorization", "")
        claims: dict[str, Any] | None = None
        if authorization.startswith("Bearer "):
            try:
                claims = jwt.decode(authorization[7:], options={"verify_signature": False})
            except jwt.PyJWTError:
                claims = None
        body = await request.read()
        return web.json_response({
            "tool saw": f"{request.method} {request.path_qs}",
            "credential": "a sidecar-minted JWT" if claims else ("something else" if authorization else "none"),
            "claims": claims,
            "x-agent-decision": request.headers.get("X-Agent-Decision"),
            "agent's own secret reached the tool": "agent-own-secret" in authorization or "agent-own-secret" in str(request.headers),
            "body_bytes": len(body),
        })

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def show(title: str, response: httpx.Response) -> None:
    print(f"\n=== {title}")
    print(f"<-- HTTP {response.status_code} {response.headers.get('content-type', '')}")
    try:
        print(json.dumps(response.json(), indent=2)[:1800])
    except ValueError:
        print(response.text[:500])


async def play(proxy: str, admin: str) -> None:
    async with httpx.AsyncClient(timeout=10) as agent:
        task = (await agent.post(f"{admin}/v1/tasks", json={
            "intent": "look up customer 42 and tidy their record", "ttl_seconds": 3600})).json()
        print(f"\nOpened task {task['id']}: {task['intent']!r}")

        print(f"\n--> GET {proxy}/crm/customers/42  (X-Agent-Task, and the agent's own 'Authorization: Bearer agent-own-secret')")
        show("1. allowed: the tool got a credential minted for this one call; the agent's header was stripped",
             await agent.get(f"{proxy}/crm/customers/42",
                             headers={"X-Agent-Task": task["id"], "Authorization": "Bearer agent-own-secret"}))

        print(f"\n--> POST {proxy}/crm/customers  (no task)")
        show("2. denied, with the policy's reasons (problem+json)",
             await agent.post(f"{proxy}/crm/customers", json={"name": "Ada"}))

        print(f"\n--> DELETE {proxy}/crm/customers/42  (X-Agent-Task)")
        show("3. held for human approval: not forwarded; an approval id to retry with",
             await agent.delete(f"{proxy}/crm/customers/42", headers={"X-Agent-Task": task["id"]}))


async def main(argv: list[str] | None = None) -> int:
    options = arguments().parse_args(argv)
    try:
        config = load_config(Path(options.config))
        sidecar = build_sidecar(config)
    except ConfigError as exc:
        print(f"agent-sidecar: config error: {exc}", file=sys.stderr)
        return 2
    tool = web.AppRunner(demo_tool(), access_log=None)
    await tool.setup()
    await web.TCPSite(tool, "127.0.0.1", options.tool_port).start()
    await sidecar.start()
    proxy, admin = f"http://{config.proxy}", f"http://{config.admin}"
    print(f"demo tool on http://127.0.0.1:{options.tool_port}; sidecar proxy {proxy}, admin {admin}, metrics http://{config.metrics}")
    try:
        await play(proxy, admin)
        if options.once:
            return 0
        print(f"""
The sidecar keeps serving (Ctrl-C to stop). Try:
  curl -s {proxy}/crm/customers/7 | python3 -m json.tool
  curl -s -x {proxy} http://crm.example.com/customers/7
  curl -s -X POST {proxy}/crm/customers -H 'content-type: application/json' -d '{{}}'
  curl -s {admin}/.well-known/jwks.json
  curl -s http://{config.metrics}/readyz
  .venv/bin/agent-sidecar audit verify {config.audit_path}
""", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await sidecar.stop()
        await tool.cleanup()
    return 0


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sidecar.demo", description=__doc__)
    parser.add_argument("--config", default=str(EXAMPLE_CONFIG), help="sidecar config (default: examples/sidecar.yaml)")
    parser.add_argument("--tool-port", type=int, default=TOOL_PORT, help="port of the demo tool the routes point at")
    parser.add_argument("--once", action="store_true", help="play the demo and exit instead of serving on")
    return parser


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
