"""Real parts for the tests: an upstream tool, an OPA Data API server, a running sidecar."""

from __future__ import annotations

import contextlib
import errno
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from sidecar.app import Sidecar, build_sidecar
from sidecar.config import parse_config
from sidecar.policy.embedded import EmbeddedEngine
from sidecar.policy.engine import PolicyError

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_POLICY = ROOT / "tests" / "policies" / "fixture"
SHIPPED_POLICY = ROOT / "rego"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: dict[str, list[str]]
    body: bytes


@dataclass
class EchoTool:
    """An upstream tool on loopback that records every request it receives."""

    port: int = 0
    seen: list[Seen] = field(default_factory=list)
    runner: web.AppRunner | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        self.port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers: dict[str, list[str]] = {}
        for name, value in request.headers.items():
            headers.setdefault(name.lower(), []).append(value)
        self.seen.append(Seen(request.method, request.path, request.query_string, headers, body))
        if request.path.endswith("/mcp"):
            message = json.loads(body)
            reply: Any = {"jsonrpc": "2.0", "id": message.get("id"), "result": {"content": [{"type": "text", "text": "done"}]}}
            return web.json_response(reply)
        return web.json_response({"tool": "echo", "method": request.method, "path": request.path,
                                  "authorization_present": "authorization" in headers}, headers={"X-Tool": "echo"})

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()


class OpaDataApiServer:
    """Speaks OPA's REST Data API on top of the embedded real engine. Tests only, never shipped:
    no OPA server binary can be installed here (see README for pointing tests at a real `opa`)."""

    def __init__(self, rego_dir: Path | None = None, *, bundle: Path | None = None, bundle_name: str = "authz") -> None:
        """A policy directory (``opa run --server DIR``) or a bundle file (``opa run --server --bundle FILE``);
        with a bundle, ``?provenance=true`` answers name its revision, as OPA's do."""
        self.bundles: dict[str, dict[str, str]] = {}
        if bundle is not None:
            policy, revision = read_opa_bundle(bundle)
            self.bundles = {bundle_name: {"revision": revision}}
            self.engine = EmbeddedEngine(policy)
        else:
            assert rego_dir is not None
            self.engine = EmbeddedEngine(rego_dir)
        self.port = 0
        self.runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/data/{path:.*}", self.data)
        app.router.add_get("/health", self.health)
        return app

    async def start(self, port: int | None = None) -> None:
        self.runner = web.AppRunner(self.app(), access_log=None)
        await self.runner.setup()
        self.port = port or free_port()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, backlog=1024, reuse_address=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def data(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"code": "invalid_parameter", "message": "body is not JSON"}, status=400)
        try:
            result = await self.engine.evaluate(request.match_info["path"], body.get("input"))
        except PolicyError as exc:
            if exc.kind == "undefined":
                return web.json_response({})  # OPA omits "result" for an undefined document
            return web.json_response({"code": "internal_error", "message": exc.message}, status=500)
        answer: dict[str, Any] = {"result": result}
        if request.query.get("provenance") == "true":
            answer["provenance"] = {"version": "harness", "bundles": self.bundles}
        return web.json_response(answer)

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()
        await self.engine.close()


def read_opa_bundle(path: Path) -> tuple[Any, str]:
    """Read an OPA bundle as ``opa run --bundle`` does, independently of sidecar.policy.bundle: the
    tarball's .rego files at their paths, each data.json at its directory's data path, the manifest's revision."""
    import tarfile

    from sidecar.policy.loader import PolicyBundle

    policy = PolicyBundle(root=path)
    revision = ""
    with tarfile.open(path, "r:gz") as archive:
        for member in archive.getmembers():
            if not member.isfile():
                continue
            name = member.name.lstrip("/")
            extracted = archive.extractfile(member)
            assert extracted is not None
            content = extracted.read()
            if name.endswith(".rego"):
                policy.modules[name] = content.decode()
            elif name.rsplit("/", 1)[-1] == "data.json":
                directory = name.rsplit("/", 1)[0] if "/" in name else ""
                policy.data.append((directory.replace("/", "."), json.loads(content), path / name))
            elif name == ".manifest":
                revision = json.loads(content).get("revision", "")
    return policy, revision


def sidecar_config(tmp: Path, upstream: str, *, policy_dir: Path = FIXTURE_POLICY, engine: str = "embedded",
                   rest_url: str | None = None, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "listeners": {"proxy": f"127.0.0.1:{free_port()}", "admin": f"127.0.0.1:{free_port()}",
                      "metrics": f"127.0.0.1:{free_port()}"},
        "state_dir": str(tmp / "state"),
        "limits": {"max_body_bytes": 1024 * 1024},
        "policy": {"engine": engine, "rego_dir": str(policy_dir), "timeout_ms": 1000,
                   **({"rest": {"url": rest_url}} if rest_url else {})},
        "identity": {"static": "spiffe://test/ns/agents/sa/agent-under-test"},
        "routes": [
            {"name": "crm", "match": {"path_prefix": "/crm", "host": "crm.example.com"},
             "upstream": f"{upstream}/crm", "labels": {"environment": "dev", "data_classification": "confidential"},
             "credential": {"strip_headers": ["X-Api-Key"]}},
            {"name": "payments", "match": {"path_prefix": "/payments", "host": "payments.example.com"},
             "upstream": f"{upstream}/payments", "labels": {"environment": "prod", "reversible": False}},
            {"name": "tools", "match": {"path_prefix": "/tools"}, "upstream": f"{upstream}/tools",
             "labels": {"protocol": "mcp"}},
        ],
    }
    for key, value in overrides.items():
        config[key] = value
    return config


@dataclass
class RunningSidecar:
    sidecar: Sidecar

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.sidecar.config.proxy.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.sidecar.config.admin.port}"

    @property
    def metrics(self) -> str:
        return f"http://127.0.0.1:{self.sidecar.config.metrics.port}"

    @property
    def audit_path(self) -> Path:
        return self.sidecar.config.audit_path


# The make_sidecar fixture (tests/conftest.py): starts a sidecar from sidecar_config(**options).
SidecarFactory = Callable[..., Awaitable[RunningSidecar]]


LISTENERS = ("proxy", "admin", "metrics")


async def start_sidecar(tmp: Path, config: dict[str, Any]) -> RunningSidecar:
    """Build and start a sidecar from ``config``. A listener port that free_port() chose can be taken before
    the sidecar binds it (an outgoing connection's ephemeral port, from any test): then the listeners get
    fresh ports, in ``config`` itself so that the caller sees them, and the sidecar starts again."""
    for attempt in range(5):
        path = tmp / "sidecar.yaml"
        path.write_text(yaml.safe_dump(config))
        sidecar = build_sidecar(parse_config(config, path))
        try:
            await sidecar.start()
        except OSError as exc:
            await sidecar.stop()
            if exc.errno != errno.EADDRINUSE or attempt == 4:
                raise
            listeners = config.get("listeners", {})
            for name in LISTENERS:
                if name in listeners:
                    listeners[name] = f"127.0.0.1:{free_port()}"
            continue
        return RunningSidecar(sidecar)
    raise AssertionError("unreachable")


async def open_task(admin: str, intent: str = "look up customer 42", ttl_seconds: int = 600) -> str:
    """Open a task through the admin API, as an agent or its orchestrator does; return its id."""
    import httpx

    async with httpx.AsyncClient() as client:
        response = await client.post(f"{admin}/v1/tasks", json={"intent": intent, "ttl_seconds": ttl_seconds})
    assert response.status_code == 201, response.text
    task_id: str = response.json()["id"]
    return task_id


async def serve_app(app: web.Application, ssl_context: Any = None) -> tuple[web.AppRunner, int]:
    """Serve an aiohttp app on a free loopback port; the caller cleans up the runner."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ssl_context).start()
    return runner, port


async def send_connect(proxy_port: int, authority: str) -> tuple[Any, Any, bytes]:
    """Open a raw connection to the proxy, send CONNECT authority, return (reader, writer, response head)."""
    import asyncio

    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    return reader, writer, head


@contextlib.asynccontextmanager
async def serving_asgi(app: Any) -> AsyncIterator[str]:
    """Serve an ASGI app (an MCP SDK server, say) with uvicorn on a free loopback port; yield its base URL."""
    import asyncio

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            serving.result()  # it could not start: say why
        await asyncio.sleep(0.01)  # readiness poll of an in-process server, not a timing assumption
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await serving
