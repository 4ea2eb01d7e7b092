"""`make bench`: one run, four variants interleaved, a table on stdout and in docs/performance.md.

Variants: ``direct`` (straight to the upstream), ``nginx`` (Debian's nginx as a plain reverse proxy,
the floor of one proxy hop), ``sidecar-embedded`` (the shipped rego/ library in process, minting and
the audit chain on) and ``sidecar-rest`` (the same, the policy asked over OPA's REST Data API).
Every process is separate: the load generator, the upstream, nginx, each sidecar and the OPA server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from . import procstat
from .micro import DECISION_PATH, run_micro
from .procs import (ROOT, LoadGen, Proc, SidecarProc, nginx_available, open_tasks, start_nginx, start_opa_data_api,
                    start_sidecar, start_upstream, wait_for_port)
from .report import write_report
from .stats import latency_summary_ms
from .wrk import run_wrk, wrk_available

VARIANTS = ("direct", "nginx", "sidecar-embedded", "sidecar-rest")
SHIPPED_POLICY = ROOT / "rego"
FIXTURE_POLICY = ROOT / "tests" / "policies" / "fixture"


@dataclass(frozen=True)
class Profile:
    tasks: int
    warmup_per_task: int
    c1_rounds: int
    c1_count: int
    fixed_rate: float
    rate_rounds: int
    rate_seconds: float
    rates: tuple[float, ...]
    step_seconds: float
    micro_count: int
    live_tasks: int
    inflight: int
    hold_seconds: float
    wrk_seconds: float
    phase_seconds: float  # bound on each unmeasured set-up step (warm-up, opening tasks) per variant


FULL = Profile(tasks=2000, warmup_per_task=2, c1_rounds=5, c1_count=300, fixed_rate=500, rate_rounds=3, rate_seconds=5,
               rates=(250, 500, 750, 1000, 1500, 2000, 2500, 3000, 4000, 5000, 6000, 8000), step_seconds=3,
               micro_count=3000, live_tasks=10_000, inflight=10_000, hold_seconds=2.0, wrk_seconds=5,
               phase_seconds=30)
SMOKE = Profile(tasks=100, warmup_per_task=1, c1_rounds=1, c1_count=20, fixed_rate=500, rate_rounds=1, rate_seconds=0.3,
                rates=(200, 400), step_seconds=0.3, micro_count=30, live_tasks=200, inflight=100, hold_seconds=0.5,
                wrk_seconds=0, phase_seconds=20)


@dataclass
class Target:
    name: str
    port: int
    tasks: list[str] = field(default_factory=list)
    cpu_pids: list[int] = field(default_factory=list)  # the proxy's own processes (nothing for direct)
    policy_pids: list[int] = field(default_factory=list)  # the OPA server of the REST variant
    rss_pids: list[int] = field(default_factory=list)
    admin_port: int = 0


@dataclass
class Results:
    meta: dict[str, Any] = field(default_factory=dict)
    micro: dict[str, dict[str, float]] = field(default_factory=dict)
    c1: dict[str, list[int]] = field(default_factory=dict)
    fixed: dict[str, list[int]] = field(default_factory=dict)
    fixed_errors: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)
    steps: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    wrk: dict[str, dict[str, float]] = field(default_factory=dict)
    memory: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "meta": self.meta, "micro": self.micro,
            "concurrency_1": {k: latency_summary_ms(v) for k, v in self.c1.items()},
            "fixed_rate": {k: {**latency_summary_ms(v), "errors": self.fixed_errors.get(k, 0)} for k, v in self.fixed.items()},
            "cpu": self.cpu, "rising_rates": self.steps, "wrk": self.wrk, "memory": self.memory,
            "errors": self.errors, "notes": self.notes,
        }


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rotated(targets: list[Target], round_number: int) -> list[Target]:
    """Each round starts with a different variant, so no variant always runs first or last."""
    shift = round_number % len(targets)
    return targets[shift:] + targets[:shift]


def pick_policy() -> tuple[Path, str]:
    """The shipped library when its decision evaluates to an allow on the workload, else the test fixture."""
    from sidecar.policy.embedded import EmbeddedEngine

    from .micro import AGENT, typical_call, typical_task
    from sidecar.context import build_input

    try:
        engine = EmbeddedEngine(SHIPPED_POLICY)
        result = engine.evaluate_sync(DECISION_PATH, build_input(typical_call(), AGENT, typical_task(time.time())))
        engine._executor.shutdown(wait=False)
        if isinstance(result, dict) and result.get("allow") is True:
            return SHIPPED_POLICY, "rego/ (the shipped library)"
        reason = f"its decision on the workload is not an allow: {json.dumps(result)[:200]}"
    except Exception as exc:  # noqa: BLE001 - any failure means: fall back and say why
        reason = f"{type(exc).__name__}: {exc}"
    return FIXTURE_POLICY, f"tests/policies/fixture (rego/ was not usable: {reason})"


class Bench:
    def __init__(self, profile: Profile, workdir: Path) -> None:
        self.profile = profile
        self.workdir = workdir
        self.results = Results()
        self.procs: list[Proc] = []
        self.sidecars: dict[str, SidecarProc] = {}
        self.targets: list[Target] = []
        self.loadgen: LoadGen | None = None
        self.upstream_port = 0

    # ------------------------------------------------------------ set-up

    async def start(self, rego_dir: Path) -> None:
        upstream, self.upstream_port = start_upstream(self.workdir, self.profile.hold_seconds)
        self.procs.append(upstream)
        await wait_for_port(upstream, self.upstream_port)
        self.targets.append(Target("direct", self.upstream_port, rss_pids=[upstream.pid]))
        if nginx_available():
            nginx, nginx_port = start_nginx(self.workdir, self.upstream_port)
            self.procs.append(nginx)
            await wait_for_port(nginx, nginx_port)
            group = [nginx.pid, *procstat.children(nginx.pid)]
            self.targets.append(Target("nginx", nginx_port, cpu_pids=group, rss_pids=group))
        else:
            self.results.notes.append("nginx is not installed here (/usr/sbin/nginx): the nginx variant was skipped")
        embedded = await start_sidecar(self.workdir, "sidecar-embedded", self.upstream_port, rego_dir, "embedded")
        self.procs.append(embedded.proc)
        self.sidecars["sidecar-embedded"] = embedded
        opa, opa_port = start_opa_data_api(self.workdir, rego_dir)
        self.procs.append(opa)
        await wait_for_port(opa, opa_port)
        rest = await start_sidecar(self.workdir, "sidecar-rest", self.upstream_port, rego_dir, "rest",
                                   rest_url=f"http://127.0.0.1:{opa_port}")
        rest.extra.append(opa)
        self.procs.append(rest.proc)
        self.sidecars["sidecar-rest"] = rest
        for name, sidecar in self.sidecars.items():
            self.targets.append(Target(name, sidecar.proxy_port, cpu_pids=[sidecar.proc.pid],
                                       policy_pids=[p.pid for p in sidecar.extra], rss_pids=[sidecar.proc.pid],
                                       admin_port=sidecar.admin_port))
        self.loadgen = await LoadGen.start()
        self.results.meta["loadgen_fd_limit"] = self.loadgen.fd_limit

    async def stop(self) -> None:
        if self.loadgen is not None:
            await self.loadgen.stop()
        for proc in reversed(self.procs):
            proc.stop()

    @property
    def gen(self) -> LoadGen:
        assert self.loadgen is not None
        return self.loadgen

    def job(self, target: Target, **job: Any) -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": target.port, "tasks": target.tasks, **job}

    def count_errors(self, target: Target, result: dict[str, Any]) -> None:
        self.results.errors[target.name] = self.results.errors.get(target.name, 0) + int(result.get("errors", 0))

    # ------------------------------------------------------------ phases

    async def open_workload_tasks(self) -> None:
        for target in self.targets:
            if target.admin_port:
                target.tasks = await open_tasks(target.admin_port, self.profile.tasks,
                                                max_seconds=self.profile.phase_seconds)
            else:
                # Direct and nginx get the same header shape; nothing reads it.
                target.tasks = [f"t-{n:016x}" for n in range(self.profile.tasks)]

    async def rss_at_rest(self) -> None:
        for target in self.targets:
            self.results.memory.setdefault(target.name, {})["rest_mib"] = procstat.group_rss_mib(target.rss_pids)

    async def warm_up(self) -> None:
        """Every task gets a history before anything is measured."""
        for target in self.targets:
            count = self.profile.tasks * self.profile.warmup_per_task
            result = await self.gen.run(**self.job(target, op="closed", count=count, concurrency=8,
                                                   max_seconds=self.profile.phase_seconds))
            if result["count"] < count:
                self.results.notes.append(f"warm-up: {target.name} got {result['count']} of {count} calls in "
                                          f"{self.profile.phase_seconds:.0f} s")
            if result["errors"]:
                self.results.notes.append(f"warm-up: {result['errors']} of {count} calls to {target.name} failed")

    async def concurrency_one(self) -> None:
        for round_number in range(self.profile.c1_rounds):
            for target in rotated(self.targets, round_number):
                result = await self.gen.run(**self.job(target, op="seq", count=self.profile.c1_count))
                self.results.c1.setdefault(target.name, []).extend(result["latencies_us"])
                self.count_errors(target, result)

    async def fixed_rate(self) -> None:
        cpu: dict[str, dict[str, float]] = {t.name: {"proxy_ms": 0.0, "policy_ms": 0.0, "calls": 0.0} for t in self.targets}
        for round_number in range(self.profile.rate_rounds):
            for target in rotated(self.targets, round_number):
                before = (procstat.group_cpu_ms(target.cpu_pids), procstat.group_cpu_ms(target.policy_pids))
                result = await self.gen.run(**self.job(target, op="rate", rate=self.profile.fixed_rate,
                                                       duration=self.profile.rate_seconds, max_connections=256))
                cpu[target.name]["proxy_ms"] += procstat.group_cpu_ms(target.cpu_pids) - before[0]
                cpu[target.name]["policy_ms"] += procstat.group_cpu_ms(target.policy_pids) - before[1]
                cpu[target.name]["calls"] += result["count"]
                self.results.fixed.setdefault(target.name, []).extend(result["latencies_us"])
                self.results.fixed_errors[target.name] = self.results.fixed_errors.get(target.name, 0) + result["errors"]
                self.count_errors(target, result)
        for name, spent in cpu.items():
            per_1000 = 1000.0 / max(spent["calls"], 1.0)
            self.results.cpu[name] = {"proxy_ms_per_1000": spent["proxy_ms"] * per_1000,
                                      "policy_ms_per_1000": spent["policy_ms"] * per_1000, "calls": spent["calls"]}

    async def rising_rates(self) -> None:
        """Open loop at rising rates, one step for every variant in turn; a variant stops once it cannot keep up."""
        climbing = list(self.targets)
        for step_number, rate in enumerate(self.profile.rates):
            for target in rotated(climbing, step_number):
                result = await self.gen.run(**self.job(target, op="rate", rate=rate, duration=self.profile.step_seconds,
                                                       max_connections=512, timeout=10))
                summary = latency_summary_ms(result["latencies_us"])
                step = {"rate": rate, "achieved": result["achieved"], "errors": result["errors"],
                        "p50": summary["p50"], "p99": summary["p99"], "connections": result["connections"]}
                self.results.steps.setdefault(target.name, []).append(step)
                if result["errors"] or result["achieved"] < 0.9 * rate or summary["p99"] > 50:
                    climbing.remove(target)
                await asyncio.sleep(0.2 if self.profile is FULL else 0)  # let a backlog drain before the next variant
            if not climbing:
                break
        for target in climbing:
            self.results.notes.append(f"{target.name} kept up with the highest offered rate ({self.profile.rates[-1]:.0f}/s): "
                                      "its ceiling here is the load generator's, not its own")

    async def closed_loop_peak(self) -> None:
        if not self.profile.wrk_seconds:
            return
        if not wrk_available():
            self.results.notes.append("wrk is not installed: the closed-loop peak column is empty (scripts/install-system-deps.sh installs it)")
            return
        for target in self.targets:
            self.results.wrk[target.name] = await run_wrk(target.port, target.tasks, self.workdir,
                                                          connections=32, seconds=self.profile.wrk_seconds)

    async def live_tasks(self) -> None:
        """RSS with many live tasks, each one call into its history (both bounded in time)."""
        for target in self.targets:
            if not target.admin_port:
                continue
            memory = self.results.memory.setdefault(target.name, {})
            tasks = await open_tasks(target.admin_port, self.profile.live_tasks, max_seconds=self.profile.phase_seconds)
            result = await self.gen.run(host="127.0.0.1", port=target.port, tasks=tasks, op="closed",
                                        count=len(tasks), concurrency=16, max_seconds=self.profile.phase_seconds)
            memory["live_task_calls"] = result["count"]
            memory["live_tasks"] = len(tasks)
            memory["live_tasks_mib"] = procstat.group_rss_mib(target.rss_pids)
            memory["live_tasks_call_errors"] = result["errors"]
            target.tasks = tasks

    async def calls_in_flight(self) -> None:
        """RSS while ``inflight`` calls are open at once and the upstream holds each one."""
        for target in self.targets:
            if target.name == "direct":
                continue
            peak = 0.0
            job = asyncio.ensure_future(self.gen.run(**self.job(target, op="inflight", count=self.profile.inflight,
                                                                path_prefix="/crm/hold", settle=self.profile.hold_seconds + 1,
                                                                batch=500, max_send_seconds=self.profile.phase_seconds)))
            while not job.done():
                peak = max(peak, procstat.group_rss_mib(target.rss_pids))
                await asyncio.sleep(0.05)
            result = job.result()
            memory = self.results.memory.setdefault(target.name, {})
            memory.update({"inflight_mib": peak, "inflight_sent": result["sent"], "inflight_peak_open": result["peak_open"],
                           "inflight_statuses": result["statuses"],
                           "inflight_connect_errors": result["connect_errors"],
                           "inflight_upstream_peak": await self.upstream_peak()})
            await asyncio.sleep(0.5 if self.profile is FULL else 0.1)

    async def upstream_peak(self) -> int:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{self.upstream_port}/_stats") as response:
                stats = await response.json()
        return int(stats["peak_holding"])


async def run(profile: Profile, out: Path | None, json_out: Path | None) -> Results:
    started = time.time()
    rego_dir, policy_note = pick_policy()
    log(f"policy: {policy_note}")
    workdir = Path(tempfile.mkdtemp(prefix="agent-sidecar-bench-"))
    bench = Bench(profile, workdir)
    bench.results.meta["policy"] = policy_note
    try:
        log("micro-benchmarks of the request-path steps")
        bench.results.micro = run_micro(rego_dir, profile.micro_count)
        log("starting upstream, nginx, OPA Data API server, sidecars and the load generator")
        await bench.start(rego_dir)
        await bench.rss_at_rest()
        await bench.open_workload_tasks()
        log("warm-up (every task gets a history)")
        await bench.warm_up()
        phases = [("concurrency 1", bench.concurrency_one), (f"fixed rate {profile.fixed_rate:.0f}/s", bench.fixed_rate),
                  ("open loop at rising rates", bench.rising_rates), ("closed-loop peak (wrk)", bench.closed_loop_peak),
                  ("live tasks", bench.live_tasks), ("calls in flight", bench.calls_in_flight)]
        for title, phase in phases:
            log(title)
            await phase()
    finally:
        await bench.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    bench.results.meta["duration_seconds"] = time.time() - started
    bench.results.meta["variants"] = [t.name for t in bench.targets]
    table = write_report(bench.results, profile_name="full" if profile is FULL else "smoke", out=out)
    print(table)
    if json_out is not None:
        json_out.write_text(json.dumps(bench.results.as_json(), indent=1))
    return bench.results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny counts: checks the benchmark runs, measures nothing")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown report to update (default docs/performance.md; with --smoke, none)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results as JSON")
    args = parser.parse_args(argv)
    profile = SMOKE if args.smoke else FULL
    out = args.out if args.out is not None else (None if args.smoke else ROOT / "docs" / "performance.md")
    asyncio.run(run(profile, out, args.json))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
