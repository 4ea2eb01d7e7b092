"""Calls/s with every call in one task against the same calls spread over many tasks (issue 14).

The calls of one task are decided one at a time (read the history, decide, reserve), so a single
busy task is bounded by that sequence; calls of different tasks never wait for each other. This
runs the bench workload (70 % GETs, 30 % 1 KB POSTs) closed-loop against a real sidecar subprocess
(embedded engine, the shipped library with its anomaly caps lifted so that one task can take the
whole run), once on SQLite and once on Redis, alternating one task and many tasks per round.

    .venv/bin/python -m bench.task_contention [--calls 4000] [--concurrency 32] [--tasks 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from . import procstat
from .procs import (ROOT, VENV_BIN, LoadGen, Proc, SidecarProc, free_port, open_tasks, sidecar_config, spawn,
                    start_upstream, wait_for_port, wait_ready)

SHIPPED_POLICY = ROOT / "rego"


def uncapped_policy(workdir: Path) -> Path:
    """The shipped library with the per-task call cap and rate anomaly lifted (one task takes every call).

    The rate is lifted by a window of no time: a cap above the 20 allowed calls the history carries is
    refused at load (it would turn the rule off without a word)."""
    target = workdir / "rego"
    shutil.copytree(SHIPPED_POLICY, target)
    data = json.loads((target / "data.json").read_text())
    data["sidecar"]["config"]["anomalies"].update(max_calls_per_task=10**9, max_calls_in_window=20,
                                                  rate_window_seconds=0)
    (target / "data.json").write_text(json.dumps(data))
    return target


def start_redis(workdir: Path) -> tuple[Proc, str]:
    port = free_port()
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed")
    proc = spawn("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                           "--dir", str(workdir)], workdir)
    return proc, f"redis://127.0.0.1:{port}/0"


async def start_sidecar(workdir: Path, name: str, upstream_port: int, rego_dir: Path,
                        redis_url: str | None) -> SidecarProc:
    config = sidecar_config(workdir, name, upstream_port, rego_dir, "embedded", None)
    if redis_url is not None:
        config["store"] = {"backend": "redis", "redis_url": redis_url}
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    command = shutil.which("agent-sidecar", path=str(VENV_BIN)) or str(VENV_BIN / "agent-sidecar")
    proc = spawn(name, [command, "run", "--config", str(config_path)], workdir)
    proxy, admin, metrics = (int(config["listeners"][k].rsplit(":", 1)[1]) for k in ("proxy", "admin", "metrics"))
    running = SidecarProc(proc, proxy, admin, metrics, config_path)
    await wait_ready(proc, f"http://127.0.0.1:{metrics}/readyz")
    return running


async def counters(metrics_port: int) -> dict[str, float]:
    """Decision conflicts and refusals by code, from the sidecar's own metrics."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{metrics_port}/metrics") as response:
            text = await response.text()
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("agent_sidecar_task_decision_conflicts_total "):
            found["conflicts"] = float(line.split()[1])
        elif line.startswith("agent_sidecar_refusals_total{"):
            code = line.split('code="', 1)[1].split('"', 1)[0]
            found[code] = float(line.rsplit(" ", 1)[1])
    return found


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


async def measure(backend: str, workdir: Path, args: argparse.Namespace, loadgen: LoadGen,
                  upstream_port: int, rego_dir: Path) -> dict[str, list[dict[str, float]]]:
    redis: Proc | None = None
    redis_url = None
    if backend == "redis":
        redis, redis_url = start_redis(workdir)
        await wait_for_port(redis, int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    sidecar = await start_sidecar(workdir, f"sidecar-{backend}", upstream_port, rego_dir, redis_url)
    results: dict[str, list[dict[str, float]]] = {"one task": [], "many tasks": []}
    try:
        for round_number in range(args.rounds):
            modes = ["one task", "many tasks"] if round_number % 2 == 0 else ["many tasks", "one task"]
            for mode in modes:
                tasks = await open_tasks(sidecar.admin_port, 1 if mode == "one task" else args.tasks)
                job = {"host": "127.0.0.1", "port": sidecar.proxy_port, "tasks": tasks, "op": "closed",
                       "concurrency": args.concurrency}
                await loadgen.run(**job, count=args.concurrency * 4)  # warm: connections open, tasks have history
                before = await counters(sidecar.metrics_port)
                cpu_before = procstat.cpu_ms(sidecar.proc.pid)
                result = await loadgen.run(**job, count=args.calls)
                cpu_per_1000 = (procstat.cpu_ms(sidecar.proc.pid) - cpu_before) * 1000 / result["count"]
                changed = delta(await counters(sidecar.metrics_port), before)
                achieved = (result["count"] - result["errors"]) / result["elapsed"]
                results[mode].append({"calls_per_s": achieved, "errors": result["errors"], "count": result["count"],
                                      "conflicts": changed.pop("conflicts", 0.0), "cpu_ms_per_1000": cpu_per_1000})
                print(f"  {backend:6} round {round_number + 1} {mode:10}: {achieved:7.0f} calls/s, "
                      f"{cpu_per_1000:5.0f} ms CPU per 1,000 calls, {result['errors']} errors of {result['count']} "
                      f"(refusals {changed or 'none'})", file=sys.stderr, flush=True)
    finally:
        sidecar.proc.stop()
        if redis is not None:
            redis.stop()
    return results


def table(results: dict[str, dict[str, list[dict[str, float]]]], args: argparse.Namespace) -> str:
    lines = [f"closed loop, {args.concurrency} connections, {args.calls} calls per run, median of {args.rounds} runs",
             "", "| store | tasks | calls/s (median) | runs | sidecar CPU ms per 1,000 calls (median) | errors | decision conflicts |",
             "|---|---|---|---|---|---|---|"]
    for backend, modes in results.items():
        for mode, runs in modes.items():
            rates = [r["calls_per_s"] for r in runs]
            tasks = "1" if mode == "one task" else str(args.tasks)
            cpu = statistics.median(r["cpu_ms_per_1000"] for r in runs)
            lines.append(f"| {backend} | {tasks} | {statistics.median(rates):.0f} | "
                         f"{', '.join(f'{r:.0f}' for r in rates)} | {cpu:.0f} | {sum(int(r['errors']) for r in runs)} | "
                         f"{sum(int(r['conflicts']) for r in runs)} |")
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> str:
    workdir = Path(tempfile.mkdtemp(prefix="bench-tasks-"))
    rego_dir = uncapped_policy(workdir)
    upstream, upstream_port = start_upstream(workdir, 0.0)
    loadgen = await LoadGen.start()
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    try:
        await wait_for_port(upstream, upstream_port)
        for backend in args.backends:
            results[backend] = await measure(backend, workdir, args, loadgen, upstream_port, rego_dir)
    finally:
        await loadgen.stop()
        upstream.stop()
    return table(results, args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.task_contention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tasks", type=int, default=256, help="how many tasks the spread run uses")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=["sqlite", "redis"], choices=["sqlite", "redis"])
    args = parser.parse_args(argv)
    started = time.time()
    print(asyncio.run(run(args)))
    print(f"\n({time.time() - started:.0f} s; {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
