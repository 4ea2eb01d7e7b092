"""`make bench`: one run, five variants interleaved, a table on stdout and in docs/performance.md.

Variants: ``direct`` (straight to the upstream), ``nginx`` (Debian's nginx as a plain reverse proxy,
the floor of one proxy hop), ``sidecar-one-rule`` (the sidecar with a one-rule policy that always
allows: the cost of the path without the policy's), ``sidecar-embedded`` (the shipped rego/ library
in process) and ``sidecar-rest`` (the shipped library asked over OPA's REST Data API); minting and
the audit chain are on in every sidecar. Every process is separate: the load generator, wrk, the
upstream, nginx, each sidecar and the OPA server. With valgrind installed, the full run also counts
the instructions of one evaluation of each policy (bench.policy_cost) before any server starts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from . import micro, procstat
from .ab import ONE_RULE, one_rule_policy
from .floor import start_floor
from .micro import DECISION_PATH, run_micro
from .procs import (ROOT, LoadGen, Proc, SidecarProc, nginx_available, open_tasks, start_nginx, start_opa_data_api,
                    start_sidecar, start_upstream, wait_for_port)
from .report import write_report
from .stats import latency_summary_ms
from .wrk import run_wrk, wrk_available, wrk_summary

VARIANTS = ("direct", "nginx", "sidecar-one-rule", "sidecar-embedded", "sidecar-rest", "floor-one-rule", "floor-shipped")
SHIPPED = "sidecar-embedded"  # the targets are this variant's figures
ONE_RULE_VARIANT = "sidecar-one-rule"
SOAKED = (ONE_RULE_VARIANT, SHIPPED)
FLOOR, FLOOR_ONE_RULE = "floor-shipped", "floor-one-rule"  # bench.floor: evaluate, sign, forward, nothing else
SHIPPED_POLICY = ROOT / "rego"
FIXTURE_POLICY = ROOT / "tests" / "policies" / "fixture"


@dataclass(frozen=True)
class Profile:
    name: str
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
    wrk_rounds: int  # rounds of wrk -c1 then wrk -c32 on every variant; 0: no wrk
    wrk_c1_seconds: float
    wrk_seconds: float  # each wrk -c32 run
    soak_calls: int
    soak_concurrency: int
    soak_max_seconds: float  # bound on the soak's calls, so that a slow sidecar cannot make the run unbounded
    settle_seconds: float  # how long RSS and descriptors may take to come back after the soak
    policy_cost: bool  # count instructions under valgrind (about a minute)
    phase_seconds: float  # bound on each unmeasured set-up step (warm-up, opening tasks) per variant


FULL = Profile(name="full", tasks=2000, warmup_per_task=2, c1_rounds=3, c1_count=200, fixed_rate=500, rate_rounds=2,
               rate_seconds=4, rates=(250, 500, 1000, 1500, 2000, 3000, 4000, 6000, 8000), step_seconds=2,
               micro_count=2000, live_tasks=10_000, inflight=10_000, hold_seconds=2.0, wrk_rounds=2, wrk_c1_seconds=4,
               wrk_seconds=5, soak_calls=20_000, soak_concurrency=64, soak_max_seconds=120, settle_seconds=30,
               policy_cost=True, phase_seconds=25)
SMOKE = Profile(name="smoke", tasks=100, warmup_per_task=1, c1_rounds=1, c1_count=20, fixed_rate=500, rate_rounds=1,
                rate_seconds=0.3, rates=(200, 400), step_seconds=0.3, micro_count=30, live_tasks=200, inflight=100,
                hold_seconds=0.5, wrk_rounds=1, wrk_c1_seconds=1, wrk_seconds=1, soak_calls=200, soak_concurrency=8,
                soak_max_seconds=20, settle_seconds=5, policy_cost=False, phase_seconds=20)


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
    instructions: dict[str, Any] = field(default_factory=dict)
    c1: dict[str, list[int]] = field(default_factory=dict)
    fixed: dict[str, list[int]] = field(default_factory=dict)
    fixed_errors: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)
    steps: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    wrk_c1: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    wrk_c32: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    memory: dict[str, dict[str, Any]] = field(default_factory=dict)
    soak: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "meta": self.meta, "micro": self.micro, "instructions": self.instructions,
            "concurrency_1": {k: latency_summary_ms(v) for k, v in self.c1.items()},
            "fixed_rate": {k: {**latency_summary_ms(v), "errors": self.fixed_errors.get(k, 0)} for k, v in self.fixed.items()},
            "cpu": self.cpu, "rising_rates": self.steps,
            "wrk": {"c1": self.wrk_c1, "c32": self.wrk_c32,
                    "summary_c1": {k: wrk_summary(v) for k, v in self.wrk_c1.items()},
                    "summary_c32": {k: wrk_summary(v) for k, v in self.wrk_c32.items()}},
            "memory": self.memory, "soak": self.soak, "errors": self.errors, "phases_seconds": self.phases,
            "notes": self.notes,
        }


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rotated(targets: list[Target], round_number: int) -> list[Target]:
    """Each round starts with a different variant, so no variant always runs first or last."""
    shift = round_number % len(targets)
    return targets[shift:] + targets[:shift]


def typical_input() -> dict[str, Any]:
    """The typical policy input (a GET inside a task with a full history), as bench.micro builds it."""
    for module in (micro, sys.modules.get("bench.policy_cost")):
        build = getattr(module, "typical_input", None)
        if callable(build):
            document: dict[str, Any] = build()
            return document
    from sidecar.context import build_input

    return build_input(micro.typical_call(), micro.AGENT, micro.typical_task(time.time()))


def pick_policy() -> tuple[Path, str]:
    """The shipped library when its decision evaluates to an allow on the workload, else the test fixture."""
    from sidecar.policy.embedded import EmbeddedEngine

    try:
        engine = EmbeddedEngine(SHIPPED_POLICY)
        result = engine.evaluate_sync(DECISION_PATH, typical_input())
        engine.close_now()
        if isinstance(result, dict) and result.get("allow") is True:
            return SHIPPED_POLICY, "rego/ (the shipped library)"
        reason = f"its decision on the workload is not an allow: {json.dumps(result)[:200]}"
    except Exception as exc:  # noqa: BLE001 - any failure means: fall back and say why
        reason = f"{type(exc).__name__}: {exc}"
    return FIXTURE_POLICY, f"tests/policies/fixture (rego/ was not usable: {reason})"


def time_one_rule_evaluation(one_rule_dir: Path, count: int) -> dict[str, float]:
    """The embedded evaluation of the one-rule policy on the same typical input, timed like bench.micro's steps."""
    from sidecar.policy.embedded import EmbeddedEngine

    document = typical_input()
    engine = EmbeddedEngine(one_rule_dir)
    try:
        return micro.timed(lambda: engine.evaluate_sync(DECISION_PATH, document), count)
    finally:
        engine.close_now()


async def count_instructions(policies: dict[str, Path], workdir: Path) -> dict[str, Any]:
    """Instructions per evaluation of each policy on the typical input (bench.policy_cost), side by side.

    Counts do not depend on timing, so the policies are counted at once (one valgrind each, on two cores).
    """
    from . import policy_cost

    document = workdir / "typical-input.json"
    document.write_text(json.dumps(typical_input()))
    started = time.time()

    def one(rego: Path) -> int:
        return policy_cost.per_evaluation(rego, "sidecar.authz.decision", document)

    counted = await asyncio.gather(*(asyncio.to_thread(one, rego) for rego in policies.values()),
                                   return_exceptions=True)
    span = policy_cost.MANY - policy_cost.FEW
    found: dict[str, Any] = {"source": "this run (bench.policy_cost.per_evaluation: valgrind callgrind, "
                             f"({policy_cost.MANY} - {policy_cost.FEW} evaluations) / {span}, data checked at load, "
                             "GOGC=off, one Go P)",
                             "input_bytes": len(document.read_bytes()), "seconds": time.time() - started}
    for name, value in zip(policies, counted):
        if isinstance(value, BaseException):
            found[name] = None
            found.setdefault("errors", {})[name] = f"{type(value).__name__}: {value}"[:300]
        else:
            found[name] = int(value)
    return found


@dataclass
class Sample:
    at: float
    rss_mib: float
    fds: int


def sample(pid: int) -> Sample:
    return Sample(time.monotonic(), procstat.rss_mib(pid), procstat.open_fds(pid))


def steady(samples: list[Sample], window: int = 4) -> bool:
    """The last ``window`` samples agree: the same descriptor count, RSS within 1 %."""
    if len(samples) < window:
        return False
    last = samples[-window:]
    rss = [s.rss_mib for s in last]
    return len({s.fds for s in last}) == 1 and max(rss) - min(rss) <= 0.01 * max(rss)


def back_within(before: Sample, after: Sample, share: float = 0.10) -> dict[str, bool]:
    return {"rss": after.rss_mib <= before.rss_mib * (1 + share), "fds": after.fds <= before.fds * (1 + share)}


async def poll(pid: int, until: Callable[[list[Sample]], bool], max_seconds: float,
               interval: float = 0.5) -> tuple[list[Sample], bool]:
    """Sample RSS and descriptors every ``interval`` until ``until(samples)`` holds or the time runs out."""
    deadline = time.monotonic() + max_seconds
    samples = [sample(pid)]
    while not until(samples):
        if time.monotonic() >= deadline:
            return samples, False
        await asyncio.sleep(interval)
        samples.append(sample(pid))
    return samples, True


class Bench:
    def __init__(self, profile: Profile, workdir: Path) -> None:
        self.profile = profile
        self.workdir = workdir
        self.results = Results()
        self.procs: list[Proc] = []
        self.sidecars: dict[str, SidecarProc] = {}
        self.targets: list[Target] = []
        # bench.floor's proxies: measured at rest and by wrk only, beside the sidecars (they keep no tasks).
        self.floors: list[Target] = []
        self.loadgen: LoadGen | None = None
        self.upstream_port = 0

    # ------------------------------------------------------------ set-up

    async def start(self, rego_dir: Path, one_rule_dir: Path) -> None:
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
        for name, policy in ((ONE_RULE_VARIANT, one_rule_dir), (SHIPPED, rego_dir)):
            sidecar = await start_sidecar(self.workdir, name, self.upstream_port, policy, "embedded")
            self.procs.append(sidecar.proc)
            self.sidecars[name] = sidecar
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
        await self.start_floors(rego_dir, one_rule_dir)
        self.loadgen = await LoadGen.start()
        self.results.meta["loadgen_fd_limit"] = self.loadgen.fd_limit

    async def start_floors(self, rego_dir: Path, one_rule_dir: Path) -> None:
        for name, policy in ((FLOOR_ONE_RULE, one_rule_dir), (FLOOR, rego_dir)):
            floor, port = await start_floor(self.workdir, name, self.upstream_port, policy)
            self.procs.append(floor)
            self.floors.append(Target(name, port, tasks=["t-floor"], cpu_pids=[floor.pid], rss_pids=[floor.pid]))

    async def stop(self) -> None:
        if self.loadgen is not None:
            await self.loadgen.stop()
        for proc in reversed(self.procs):
            proc.stop()

    @property
    def gen(self) -> LoadGen:
        assert self.loadgen is not None
        return self.loadgen

    @property
    def full(self) -> bool:
        return self.profile.name == "full"

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
        for target in self.targets + self.floors:
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

    async def wrk_rounds(self) -> None:
        """wrk -t1 -c1 (latency) then wrk -t1 -c32 (allowed calls/s, p99, CPU per allowed call), in rounds."""
        if not self.profile.wrk_rounds:
            return
        if not wrk_available():
            self.results.notes.append("wrk is not installed: the wrk figures are empty (scripts/install-system-deps.sh "
                                      "installs it)")
            return
        for round_number in range(self.profile.wrk_rounds):
            for target in rotated(self.targets + self.floors, round_number):
                one = await run_wrk(target.port, target.tasks, self.workdir, connections=1,
                                    seconds=self.profile.wrk_c1_seconds)
                self.results.wrk_c1.setdefault(target.name, []).append(one)
                before = (procstat.group_cpu_ms(target.cpu_pids), procstat.group_cpu_ms(target.policy_pids))
                many = await run_wrk(target.port, target.tasks, self.workdir, connections=32,
                                     seconds=self.profile.wrk_seconds)
                many["proxy_cpu_ms"] = procstat.group_cpu_ms(target.cpu_pids) - before[0]
                many["policy_cpu_ms"] = procstat.group_cpu_ms(target.policy_pids) - before[1]
                self.results.wrk_c32.setdefault(target.name, []).append(many)

    async def fixed_rate(self) -> None:
        cpu: dict[str, dict[str, float]] = {t.name: {"proxy_ms": 0.0, "policy_ms": 0.0, "calls": 0.0, "allowed": 0.0}
                                            for t in self.targets}
        for round_number in range(self.profile.rate_rounds):
            for target in rotated(self.targets, round_number):
                before = (procstat.group_cpu_ms(target.cpu_pids), procstat.group_cpu_ms(target.policy_pids))
                result = await self.gen.run(**self.job(target, op="rate", rate=self.profile.fixed_rate,
                                                       duration=self.profile.rate_seconds, max_connections=256))
                cpu[target.name]["proxy_ms"] += procstat.group_cpu_ms(target.cpu_pids) - before[0]
                cpu[target.name]["policy_ms"] += procstat.group_cpu_ms(target.policy_pids) - before[1]
                cpu[target.name]["calls"] += result["count"]
                cpu[target.name]["allowed"] += result["count"] - result["errors"]
                self.results.fixed.setdefault(target.name, []).extend(result["latencies_us"])
                self.results.fixed_errors[target.name] = self.results.fixed_errors.get(target.name, 0) + result["errors"]
                self.count_errors(target, result)
        for name, spent in cpu.items():
            per_1000 = 1000.0 / max(spent["allowed"], 1.0)
            self.results.cpu[name] = {"proxy_ms_per_1000": spent["proxy_ms"] * per_1000,
                                      "policy_ms_per_1000": spent["policy_ms"] * per_1000, "calls": spent["calls"],
                                      "allowed": spent["allowed"]}

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
                await asyncio.sleep(0.2 if self.full else 0)  # let a backlog drain before the next variant
            if not climbing:
                break
        for target in climbing:
            self.results.notes.append(f"{target.name} kept up with the highest offered rate ({self.profile.rates[-1]:.0f}/s): "
                                      "its ceiling here is the load generator's, not its own")

    async def soak(self) -> None:
        """``soak_calls`` calls at ``soak_concurrency``; RSS and descriptors before, and once settled after.

        Before: sampled every 0.5 s until four samples in a row agree (same descriptor count, RSS within 1 %).
        After: sampled every 0.5 s until four agree *and* both are back within 10 % of before, or until
        ``settle_seconds`` have passed (then the last sample is the figure, and the check fails).
        """
        for target in self.targets:
            if target.name not in SOAKED:
                continue
            pid = target.cpu_pids[0]
            before_samples, _ = await poll(pid, steady, max_seconds=10)
            before = before_samples[-1]
            peak = before.rss_mib
            cpu_before = procstat.cpu_ms(pid)
            job = asyncio.ensure_future(self.gen.run(**self.job(target, op="closed", count=self.profile.soak_calls,
                                                                concurrency=self.profile.soak_concurrency,
                                                                max_seconds=self.profile.soak_max_seconds)))
            peak_fds = before.fds
            while not job.done():
                now = sample(pid)
                peak, peak_fds = max(peak, now.rss_mib), max(peak_fds, now.fds)
                await asyncio.sleep(0.1)
            result = job.result()
            cpu_ms = procstat.cpu_ms(pid) - cpu_before
            finished = time.monotonic()

            def settled(samples: list[Sample]) -> bool:
                return steady(samples) and all(back_within(before, samples[-1]).values())

            after_samples, _ = await poll(pid, settled, max_seconds=self.profile.settle_seconds)
            after = after_samples[-1]
            back = back_within(before, after)
            allowed = result["count"] - result["errors"]
            self.results.soak[target.name] = {
                "calls": result["count"], "errors": result["errors"], "allowed": allowed,
                "concurrency": self.profile.soak_concurrency,
                "wanted_calls": self.profile.soak_calls, "seconds": result["elapsed"],
                "calls_per_s": result["count"] / max(result["elapsed"], 1e-9),
                "cpu_ms_per_1000_allowed": cpu_ms * 1000 / max(allowed, 1),
                "rss_before_mib": before.rss_mib, "rss_peak_mib": peak, "rss_after_mib": after.rss_mib,
                "fds_before": before.fds, "fds_peak": peak_fds, "fds_after": after.fds,
                "settle_seconds": after.at - finished, "rss_back": back["rss"], "fds_back": back["fds"],
                "passed": back["rss"] and back["fds"] and result["count"] >= self.profile.soak_calls,
            }
            if result["count"] < self.profile.soak_calls:
                self.results.notes.append(f"soak: {target.name} got {result['count']} of {self.profile.soak_calls} calls "
                                          f"in {self.profile.soak_max_seconds:.0f} s")

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
            await asyncio.sleep(0.5 if self.full else 0.1)

    async def upstream_peak(self) -> int:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            async with session.get(f"http://127.0.0.1:{self.upstream_port}/_stats") as response:
                stats = await response.json()
        return int(stats["peak_holding"])


async def run(profile: Profile, out: Path | None, json_out: Path | None, *, policy_cost: bool) -> Results:
    started = time.time()
    rego_dir, policy_note = pick_policy()
    log(f"policy: {policy_note}")
    workdir = Path(tempfile.mkdtemp(prefix="agent-sidecar-bench-"))
    one_rule_dir = one_rule_policy(workdir)
    bench = Bench(profile, workdir)
    results = bench.results
    results.meta["policy"] = policy_note
    results.meta["one_rule_policy"] = ONE_RULE.strip()
    results.meta["fixed_rate"] = profile.fixed_rate

    async def phase(title: str, step: Callable[[], Any]) -> None:
        log(title)
        began = time.time()
        outcome = step()
        if asyncio.iscoroutine(outcome):
            await outcome
        results.phases[title] = time.time() - began

    try:
        def micro_steps() -> None:
            results.micro = run_micro(rego_dir, profile.micro_count)
            results.micro["policy evaluation (embedded, one-rule policy)"] = time_one_rule_evaluation(
                one_rule_dir, profile.micro_count)

        await phase("micro-benchmarks of the request-path steps", micro_steps)
        counting: asyncio.Future[dict[str, Any]] | None = None
        if not policy_cost:
            results.instructions = {"source": f"not measured: the {profile.name} profile or --no-policy-cost skips it"}
        elif shutil.which("valgrind") is None:
            results.instructions = {"source": "not measured: valgrind is not installed (apt-get install valgrind)"}
        else:
            # Instruction counts do not depend on timing: they run while the servers start (nothing timed), and
            # are awaited before anything is measured.
            log("instructions per evaluation (valgrind, about a minute, while the servers start)")
            counting = asyncio.ensure_future(count_instructions({SHIPPED: rego_dir, ONE_RULE_VARIANT: one_rule_dir},
                                                                workdir))
        await phase("starting upstream, nginx, OPA Data API server, sidecars and the load generator",
                    lambda: bench.start(rego_dir, one_rule_dir))
        if counting is not None:
            async def instructions() -> None:
                assert counting is not None
                results.instructions = await counting
            await phase("waiting for the instruction counts", instructions)
        await bench.rss_at_rest()  # with nothing else of the bench running
        await phase("opening the workload's tasks", bench.open_workload_tasks)
        await phase("warm-up (every task gets a history)", bench.warm_up)
        phases = [("concurrency 1", bench.concurrency_one), ("wrk -c1 and -c32", bench.wrk_rounds),
                  (f"fixed rate {profile.fixed_rate:.0f}/s", bench.fixed_rate),
                  ("open loop at rising rates", bench.rising_rates),
                  (f"soak ({profile.soak_calls} calls at concurrency {profile.soak_concurrency})", bench.soak),
                  ("live tasks", bench.live_tasks), ("calls in flight", bench.calls_in_flight)]
        for title, step in phases:
            await phase(title, step)
    finally:
        await bench.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    results.meta["duration_seconds"] = time.time() - started
    results.meta["variants"] = [t.name for t in bench.targets]
    results.meta["floors"] = [t.name for t in bench.floors]
    table = write_report(results, profile_name=profile.name, out=out)
    print(table)
    if json_out is not None:
        json_out.write_text(json.dumps(results.as_json(), indent=1))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny counts: checks the benchmark runs, measures nothing")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown report to update (default docs/performance.md; with --smoke, none)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results as JSON")
    parser.add_argument("--no-policy-cost", action="store_true",
                        help="skip counting instructions under valgrind (saves about a minute; the report says so)")
    args = parser.parse_args(argv)
    profile = SMOKE if args.smoke else FULL
    out = args.out if args.out is not None else (None if args.smoke else ROOT / "docs" / "performance.md")
    asyncio.run(run(profile, out, args.json, policy_cost=profile.policy_cost and not args.no_policy_cost))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
