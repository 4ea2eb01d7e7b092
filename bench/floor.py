"""The floor under issue 17's targets: the least any Python sidecar with this engine must do per call.

    python -m bench.floor [--seconds 10] [--rounds 3]

A proxy of a page, not the sidecar: uvloop, the request read by an ``asyncio.Protocol`` of its own
(no aiohttp; no header checks, no canonical request, no refusals), the policy evaluated on the
embedded engine exactly as the sidecar evaluates it (``sidecar.policy.embedded._evaluate_on``: the
input serialised with orjson, the answer parsed back) on engine threads of its own that report back
with one ``call_soon_threadsafe``, an ES256 credential signed for the call as the sidecar signs it,
and the request forwarded over one kept-alive upstream connection per agent connection, its answer
relayed as it came. No task store, no audit chain, no durability, no metrics, no approvals.

It runs beside the direct call with the bench's wrk mix (bench.wrk: GETs and 1 KB POSTs), against a
native upstream (nginx ``return 200``), three ways: no policy (the HTTP hops and the signature
alone), the one-rule policy, and the shipped library with its rate knobs lifted (what ``make bench``
runs). If this floor misses a target, no Python request path around this engine on this machine
meets it: the sidecar does everything this does and more (docs/performance.md, "The floor").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


from . import procstat
from .ab import one_rule_policy
from .procs import NGINX, Proc, free_port, spawn, wait_for_port
from .task_contention import uncapped_policy
from .wrk import run_wrk

RULE = "sidecar/authz/decision"
REST_SECONDS = 20.0  # the floor's RSS is read this long after every variant started, before any call
ANSWER = '{"id":42,"name":"Ada","tier":"gold","notes":[],"ok":true}'


# ------------------------------------------------------------------ the floor proxy (runs in its own process)


class EngineThreads:
    """Evaluations on threads of their own, each reporting back with one call_soon_threadsafe (as sidecar.lane)."""

    def __init__(self, rego: Path | None, count: int, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = None
        self.loop = loop
        self.jobs: queue.SimpleQueue[tuple[dict[str, Any], asyncio.Future[Any]]] = queue.SimpleQueue()
        if rego is None:
            return
        from sidecar.policy.embedded import new_engine, set_runtime_data
        from sidecar.policy.loader import read_policy_dir

        bundle = read_policy_dir(rego)
        self.engine = new_engine(bundle)
        set_runtime_data(self.engine, bundle, RULE)
        for number in range(count):
            threading.Thread(target=self._serve, name=f"floor-eval-{number}", daemon=True).start()

    def _serve(self) -> None:
        from sidecar.jsoncodec import JsonDocument
        from sidecar.policy.embedded import _evaluate_on

        while True:
            document, future = self.jobs.get()
            decision, _ = _evaluate_on(self.engine, RULE, JsonDocument(document))
            self.loop.call_soon_threadsafe(future.set_result, decision)

    async def evaluate(self, document: dict[str, Any]) -> Any:
        if self.engine is None:
            return {"allow": True}
        future = self.loop.create_future()
        self.jobs.put((document, future))
        return await future


class Signer:
    """An ES256 credential for each call, signed as the sidecar signs it (sidecar.credentials.minter.encode_jwt)."""

    def __init__(self) -> None:
        from sidecar.credentials import generate_key
        from sidecar.credentials.minter import jws_header

        with tempfile.TemporaryDirectory(prefix="floor-key-") as keys:  # the key file is read back and removed
            self.key = generate_key(Path(keys))
        self.header = jws_header(self.key)

    def credential(self, method: str, target: str, counter: int) -> bytes:
        from sidecar.credentials.minter import encode_jwt

        now = int(time.time())
        claims = {"iss": "floor", "sub": "agent", "aud": "crm", "iat": now, "exp": now + 60,
                  "jti": f"{os.getpid()}-{counter}", "htm": method, "htu": target}
        return encode_jwt(self.key, self.header, claims).encode()


def _head_and_length(buffer: bytearray) -> tuple[bytes, int] | None:
    """The head (without its blank line) and the whole message's length, once both have arrived."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buffer[:end])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    total = end + 4 + length
    return (head, total) if len(buffer) >= total else None


class Upstream(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.waiting: asyncio.Future[bytes] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        parsed = _head_and_length(self.buffer)
        if parsed is not None and self.waiting is not None:
            answer = bytes(self.buffer[:parsed[1]])
            del self.buffer[:parsed[1]]
            self.waiting.set_result(answer)
            self.waiting = None

    async def exchange(self, request: bytes) -> bytes:
        assert self.transport is not None
        self.waiting = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.waiting


class FloorProxy(asyncio.Protocol):
    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.buffer = bytearray()
        self.busy = False
        self.transport: asyncio.Transport | None = None
        self.upstream: Upstream | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._next()

    def _next(self) -> None:
        parsed = None if self.busy else _head_and_length(self.buffer)
        if parsed is None:
            return
        head, total = parsed
        body = bytes(self.buffer[len(head) + 4:total])
        del self.buffer[:total]
        self.busy = True
        asyncio.ensure_future(self._serve_until_gone(head, body))

    async def _serve_until_gone(self, head: bytes, body: bytes) -> None:
        try:
            await self._serve(head, body)
        except (ConnectionError, RuntimeError):  # wrk hung up at the end of a run: nothing to answer
            if self.transport is not None and not self.transport.is_closing():
                raise

    async def _serve(self, head: bytes, body: bytes) -> None:
        lines = head.split(b"\r\n")
        method, target, _ = lines[0].decode().split(" ")
        headers = [line for line in lines[1:] if not line.lower().startswith((b"host:", b"content-length:"))]
        decision = await self.shared.engines.evaluate(self.shared.input_for(method, target, headers))
        if not decision.get("allow"):
            raise RuntimeError(f"the floor's policy refused a call: {decision}")
        self.shared.counter += 1
        token = self.shared.signer.credential(method, target, self.shared.counter)
        request = b"\r\n".join([f"{method} /api{target} HTTP/1.1".encode(), b"Host: tool",
                                b"Authorization: Bearer " + token, *headers,
                                b"Content-Length: %d" % len(body), b"", body])
        if self.upstream is None:
            loop = asyncio.get_running_loop()
            _, self.upstream = await loop.create_connection(Upstream, "127.0.0.1", self.shared.upstream_port)
        answer = await self.upstream.exchange(request)
        assert self.transport is not None
        self.transport.write(answer)
        self.busy = False
        self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()


class Shared:
    def __init__(self, engines: EngineThreads, upstream_port: int) -> None:
        from .micro import AGENT, typical_call, typical_task
        from sidecar.context import build_input

        self.engines = engines
        self.upstream_port = upstream_port
        self.signer = Signer()
        self.counter = 0
        self.typical = build_input(typical_call(), AGENT, typical_task(time.time()))

    def input_for(self, method: str, target: str, headers: list[bytes]) -> dict[str, Any]:
        """The typical input (a task 20 calls in) with this call's method and path: built per call, as it must be."""
        path, _, query = target.partition("?")
        request = {**self.typical["request"], "method": method, "path": path, "query_string": query}
        return {**self.typical, "request": request}


async def serve(port: int, upstream_port: int, rego: Path | None, engine_threads: int) -> None:
    loop = asyncio.get_running_loop()
    shared = Shared(EngineThreads(rego, engine_threads, loop), upstream_port)
    server = await loop.create_server(lambda: FloorProxy(shared), "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


# ------------------------------------------------------------------ the measurement


async def start_native_upstream(workdir: Path) -> tuple[Proc, int]:
    prefix = workdir / "nginx"
    prefix.mkdir()
    port = free_port()
    user = "user root;\n" if os.geteuid() == 0 else ""
    temps = "\n".join(f"  {kind}_temp_path {prefix / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (prefix / "nginx.conf").write_text(f"""{user}worker_processes 1;
daemon off;
pid {prefix / 'nginx.pid'};
error_log {prefix / 'error.log'} warn;
events {{ worker_connections 4000; }}
http {{
  access_log off;
{temps}
  keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{port}; location / {{ default_type application/json; return 200 '{ANSWER}'; }} }}
}}
""")
    nginx = spawn("nginx", [str(NGINX), "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")],
                  workdir)
    await wait_for_port(nginx, port)
    return nginx, port


def floor_command(port: int, upstream_port: int, rego: Path | None, engine_threads: int = 2) -> list[str]:
    """The argv of a floor proxy on ``port``."""
    return [sys.executable, "-m", "bench.floor", "--serve", str(port), "--upstream", str(upstream_port),
            "--engine-threads", str(engine_threads)] + (["--rego", str(rego)] if rego else [])


def floor_environment() -> dict[str, str]:
    """The sidecar's Go setting (sidecar/cli.py), so that the engine costs here what it costs there."""
    from sidecar.cli import GO_GC_PERCENT

    return {**os.environ, "GOGC": os.environ.get("GOGC", GO_GC_PERCENT)}


async def start_floor(workdir: Path, name: str, upstream_port: int, rego: Path | None,
                      engine_threads: int = 2) -> tuple[Proc, int]:
    """A floor proxy in a process of its own, listening (bench.run starts two beside the sidecars)."""
    port = free_port()
    floor = spawn(name, floor_command(port, upstream_port, rego, engine_threads), workdir, env=floor_environment())
    await wait_for_port(floor, port)
    return floor, port


async def measure(seconds: float, rounds: int, engine_threads: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-floor-") as tmp:
        workdir = Path(tmp)
        nginx, upstream_port = await start_native_upstream(workdir)
        variants: dict[str, tuple[Proc | None, int]] = {"direct": (None, upstream_port)}
        try:
            for name, rego in (("floor, no policy", None), ("floor, one-rule policy", one_rule_policy(workdir)),
                               ("floor, shipped library", uncapped_policy(workdir))):
                variants[name] = await start_floor(workdir, name.replace(", ", "-").replace(" ", "-"), upstream_port, rego,
                                                   engine_threads)
            await asyncio.sleep(REST_SECONDS)
            at_rest = {name: procstat.rss_mib(process.pid) for name, (process, _) in variants.items() if process}
            tasks = ["t-floor"]
            for _, port in variants.values():
                await run_wrk(port, tasks, workdir, connections=8, seconds=2)
            results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
            for _ in range(rounds):
                for name, (process, port) in variants.items():
                    one = await run_wrk(port, tasks, workdir, connections=1, seconds=seconds)
                    before = procstat.cpu_ms(process.pid) if process else 0.0
                    many = await run_wrk(port, tasks, workdir, connections=32, seconds=seconds)
                    cpu = (procstat.cpu_ms(process.pid) - before) if process else 0.0
                    results[name].append({"c1_p50": one["p50"], "c32": many["allowed_per_s"], "c32_p99": many["p99"],
                                          "cpu": cpu * 1000 / max(1.0, many["allowed"]),
                                          "errors": one["errors"] + many["errors"]})
            report(results, at_rest, engine_threads)
        finally:
            for process, _ in variants.values():
                if process is not None:
                    process.stop()
            nginx.stop()


def report(results: dict[str, list[dict[str, float]]], at_rest: dict[str, float], engine_threads: int) -> None:
    def median(name: str, key: str) -> float:
        values = sorted(run[key] for run in results[name])
        return values[len(values) // 2]

    direct = median("direct", "c1_p50")
    print(f"engine threads: {engine_threads}; medians of {len(results['direct'])} rounds")
    print("| variant | c=1 added p50 ms | c=32 allowed calls/s | c=32 p99 ms | CPU-ms / 1,000 calls | "
          f"RSS {REST_SECONDS:.0f} s after start, MiB | errors |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in results:
        cpu = "-" if name == "direct" else f"{median(name, 'cpu'):.0f}"
        errors = sum(run["errors"] for run in results[name])
        print(f"| {name} | {median(name, 'c1_p50') - direct:.3f} | {median(name, 'c32'):.0f} | "
              f"{median(name, 'c32_p99'):.2f} | {cpu} | {at_rest.get(name, 0):.1f} | {errors:.0f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--engine-threads", type=int, default=2)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rego", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        import uvloop

        uvloop.run(serve(args.serve, args.upstream, args.rego, args.engine_threads))
        return 0
    asyncio.run(measure(args.seconds, args.rounds, args.engine_threads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
