"""A quick side-by-side of sidecar variants with wrk, for steering performance work (issue 17).

    .venv/bin/python -m bench.ab [--seconds 5] [--rounds 2] [--rego rego/ ...]

Starts the bench upstream and one sidecar per policy directory (default: the shipped library with
its call cap and rate anomaly lifted, and a one-rule policy that always allows), opens tasks, warms
them, and then alternates wrk -t1 at -c1 and -c32 over the variants. Prints calls/s, p50/p99 and the
sidecar's CPU-ms per 1,000 calls (utime + stime from /proc over the -c32 run) and its RSS. Not the
report of record (that is `make bench`); a fast loop for A/B of one change.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

from . import procstat
from .procs import open_tasks, start_sidecar, start_upstream
from .task_contention import uncapped_policy
from .wrk import run_wrk

ONE_RULE = """package sidecar.authz

import rego.v1

decision := {"allow": true, "reasons": ["one rule: allow"], "risk": "low"}
"""


def one_rule_policy(workdir: Path) -> Path:
    target = workdir / "one-rule"
    (target / "sidecar" / "authz").mkdir(parents=True)
    (target / "sidecar" / "authz" / "allow.rego").write_text(ONE_RULE)
    return target


async def measure(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        workdir = Path(tmp)
        upstream, upstream_port = start_upstream(workdir, 2.0)
        policies = [Path(p) for p in args.rego] or [uncapped_policy(workdir), one_rule_policy(workdir)]
        names = [p.name if p.name != "rego" else "shipped" for p in policies]
        sidecars = []
        try:
            for number, policy in enumerate(policies):
                sidecars.append(await start_sidecar(workdir, f"s{number}", upstream_port, policy, "embedded"))
            tasks = {}
            for name, sidecar in zip(names, sidecars):
                tasks[name] = await open_tasks(sidecar.admin_port, 256)
                await run_wrk(sidecar.proxy_port, tasks[name], workdir, connections=8, seconds=3)
            for name, sidecar in zip(names, sidecars):
                print(f"{name}: RSS {procstat.rss_mib(sidecar.proc.pid):.1f} MiB after warm-up", flush=True)
            for round_number in range(args.rounds):
                for name, sidecar in zip(names, sidecars):
                    one = await run_wrk(sidecar.proxy_port, tasks[name], workdir, connections=1, seconds=args.seconds)
                    before = procstat.cpu_ms(sidecar.proc.pid)
                    many = await run_wrk(sidecar.proxy_port, tasks[name], workdir, connections=32, seconds=args.seconds)
                    cpu = procstat.cpu_ms(sidecar.proc.pid) - before
                    # As make bench counts them: allowed = 2xx answers; CPU per 1,000 allowed calls.
                    print(json.dumps({
                        "round": round_number, "variant": name,
                        "c1_p50_ms": round(one["p50"], 3), "c1_p99_ms": round(one["p99"], 3),
                        "c1_calls_s": round(one["calls_per_s"]), "c32_calls_s": round(many["calls_per_s"]),
                        "c32_allowed_s": round(many["allowed_per_s"]),
                        "c32_p99_ms": round(many["p99"], 2), "errors": one["errors"] + many["errors"],
                        "cpu_ms_per_1000": round(cpu * 1000 / max(many["allowed"], 1)),
                    }), flush=True)
        finally:
            for sidecar in sidecars:
                sidecar.proc.stop()
            upstream.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rego", action="append", default=[])
    asyncio.run(measure(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
