"""Starting and stopping the processes under test: upstream, nginx, OPA Data API, sidecars, load generator."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
NGINX = Path("/usr/sbin/nginx")
FD_LIMIT = 65536


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def raise_fd_limit() -> None:
    """In a child before exec: as many descriptors as this user may have (10,000 calls in flight)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for wanted in (FD_LIMIT, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(wanted, hard)))
            return
        except (ValueError, OSError):
            continue


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""


def spawn(name: str, argv: list[str], workdir: Path, **options: Any) -> Proc:
    log = workdir / f"{name}.log"
    handle = log.open("wb")
    popen = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, cwd=str(ROOT),
                             preexec_fn=raise_fd_limit, **options)
    return Proc(name, popen, log)


async def wait_for_port(proc: Proc, port: int, deadline_seconds: float = 30) -> None:
    deadline = time.monotonic() + deadline_seconds
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited: {proc.tail()}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not listen on {port} in time: {proc.tail()}")


async def wait_ready(proc: Proc, url: str, deadline_seconds: float = 60) -> None:
    deadline = time.monotonic() + deadline_seconds
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.name} exited: {proc.tail()}")
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{proc.name} not ready at {url} in time: {proc.tail()}")


def start_upstream(workdir: Path, hold_seconds: float) -> tuple[Proc, int]:
    port = free_port()
    proc = spawn("upstream", [sys.executable, "-m", "bench.upstream", "--port", str(port), "--hold", str(hold_seconds)],
                 workdir)
    return proc, port


def nginx_available() -> bool:
    return NGINX.is_file() and os.access(NGINX, os.X_OK)


def nginx_conf(prefix: Path, port: int, upstream_port: int) -> str:
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers run as the user who started the bench
    temp = "\n".join(f"  {kind}_temp_path {prefix / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""{user}worker_processes 1;
daemon off;
pid {prefix / 'nginx.pid'};
error_log {prefix / 'nginx-error.log'} warn;
worker_rlimit_nofile {FD_LIMIT};
events {{ worker_connections 30000; }}
http {{
  access_log off;
{temp}
  keepalive_requests 1000000;
  upstream tool {{ server 127.0.0.1:{upstream_port}; keepalive 256; keepalive_requests 1000000; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://tool;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"""


def start_nginx(workdir: Path, upstream_port: int) -> tuple[Proc, int]:
    prefix = workdir / "nginx"
    prefix.mkdir(exist_ok=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_conf(prefix, port, upstream_port))
    proc = spawn("nginx", [str(NGINX), "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "nginx-error.log")], workdir)
    return proc, port


def start_opa_data_api(workdir: Path, rego_dir: Path) -> tuple[Proc, int]:
    port = free_port()
    proc = spawn("opa-data-api", [sys.executable, "-m", "bench.opa_data_api", "--rego", str(rego_dir), "--port", str(port)],
                 workdir)
    return proc, port


@dataclass
class SidecarProc:
    proc: Proc
    proxy_port: int
    admin_port: int
    metrics_port: int
    config_path: Path
    extra: list[Proc] = field(default_factory=list)  # the OPA Data API process of the REST variant


def sidecar_config(workdir: Path, name: str, upstream_port: int, rego_dir: Path, engine: str,
                   rest_url: str | None) -> dict[str, Any]:
    return {
        "listeners": {"proxy": f"127.0.0.1:{free_port()}", "admin": f"127.0.0.1:{free_port()}",
                      "metrics": f"127.0.0.1:{free_port()}"},
        "state_dir": str(workdir / name / "state"),
        "policy": {"engine": engine, "rego_dir": str(rego_dir), "decision_path": "sidecar/authz/decision",
                   "timeout_ms": 250, **({"rest": {"url": rest_url}} if rest_url else {})},
        "identity": {"static": "spiffe://bench/ns/agents/sa/bench-agent"},
        "credentials": {"algorithm": "ES256", "max_ttl_seconds": 300, "default_ttl_seconds": 60},
        "audit": {"fail_closed": True},
        "routes": [{
            "name": "crm", "match": {"path_prefix": "/crm"}, "upstream": f"http://127.0.0.1:{upstream_port}/crm",
            "labels": {"environment": "dev", "data_classification": "confidential"},
        }],
    }


async def start_sidecar(workdir: Path, name: str, upstream_port: int, rego_dir: Path, engine: str,
                        rest_url: str | None = None) -> SidecarProc:
    config = sidecar_config(workdir, name, upstream_port, rego_dir, engine, rest_url)
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    command = shutil.which("agent-sidecar", path=str(VENV_BIN)) or str(VENV_BIN / "agent-sidecar")
    proc = spawn(name, [command, "run", "--config", str(config_path)], workdir)
    proxy, admin, metrics = (int(config["listeners"][k].rsplit(":", 1)[1]) for k in ("proxy", "admin", "metrics"))
    running = SidecarProc(proc, proxy, admin, metrics, config_path)
    await wait_ready(proc, f"http://127.0.0.1:{running.metrics_port}/readyz")
    return running


async def open_tasks(admin_port: int, count: int, ttl_seconds: int = 1800, max_seconds: float = 1e9) -> list[str]:
    """Tasks opened through the admin API, as an agent would; fewer when ``max_seconds`` runs out."""
    deadline = time.monotonic() + max_seconds
    ids: list[str] = []
    connector = aiohttp.TCPConnector(limit=32)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one(number: int) -> str:
            body = {"intent": f"answer customer ticket {number}: read the account and add notes", "ttl_seconds": ttl_seconds}
            async with session.post(f"http://127.0.0.1:{admin_port}/v1/tasks", json=body) as response:
                if response.status != 201:
                    raise RuntimeError(f"task creation failed: HTTP {response.status} {await response.text()}")
                document = await response.json()
                return str(document["id"])
        for offset in range(0, count, 100):
            if time.monotonic() > deadline:
                break
            ids.extend(await asyncio.gather(*(one(n) for n in range(offset, min(count, offset + 100)))))
    return ids


class LoadGen:
    """The load generator process; one JSON job in, one JSON result out."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls) -> LoadGen:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.loadgen", cwd=str(ROOT), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, limit=256 * 1024 * 1024, preexec_fn=raise_fd_limit)
        loadgen = cls(process)
        hello = await loadgen._read()
        if not hello.get("ready"):
            raise RuntimeError(f"load generator did not start: {hello}")
        loadgen.fd_limit = int(hello.get("fd_limit", 0))
        return loadgen

    fd_limit: int = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    async def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await self.process.stdout.readline()
        if not line:
            raise RuntimeError("load generator exited")
        result: dict[str, Any] = json.loads(line)
        return result

    async def run(self, *, job_timeout: float = 900, **job: Any) -> dict[str, Any]:
        """One job; every job bounds itself, ``job_timeout`` is the backstop that turns a hang into an error."""
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(job) + "\n").encode())
        await self.process.stdin.drain()
        try:
            result = await asyncio.wait_for(self._read(), job_timeout)
        except asyncio.TimeoutError:
            raise RuntimeError(f"load job {job['op']} did not answer in {job_timeout:.0f} s") from None
        if "failed" in result:
            raise RuntimeError(f"load job {job['op']} failed: {result['failed']}")
        return result

    async def stop(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), 10)
        except asyncio.TimeoutError:
            self.process.kill()
            await self.process.wait()
