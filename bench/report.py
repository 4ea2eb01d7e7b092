"""The report: machine, versions, date, the tables, the issue's targets met or missed."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .stats import best_rate_under, latency_summary_ms

if TYPE_CHECKING:
    from .run import Results

BEGIN = "<!-- bench:begin (written by `make bench`; edits inside are overwritten) -->"
END = "<!-- bench:end -->"
SIDECARS = ("sidecar-embedded", "sidecar-rest")


def machine() -> dict[str, str]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    return {"cpus": str(os.cpu_count()), "cpu": model, "memory": f"{mem_kib / 1024 / 1024:.1f} GiB",
            "kernel": platform.release(), "load before run": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _command_version(argv: list[str], pattern: str) -> str:
    if shutil.which(argv[0]) is None and not Path(argv[0]).exists():
        return "not installed"
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    found = re.search(pattern, done.stdout + done.stderr)
    return found.group(1) if found else "unknown"


def versions() -> dict[str, str]:
    return {"python": platform.python_version(), "aiohttp": _version("aiohttp"),
            "OPA bindings (opa-golib-python-bindings)": _version("opa-golib-python-bindings"),
            "PyJWT": _version("PyJWT"), "cryptography": _version("cryptography"), "httpx": _version("httpx"),
            "nginx": _command_version(["/usr/sbin/nginx", "-v"], r"nginx/(\S+)"),
            "wrk": _command_version(["wrk", "-v"], r"wrk (\S+)")}


def _ms(value: float) -> str:
    return f"{value:.3f}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows), ""]


def latency_table(results: Results) -> list[str]:
    c1 = {k: latency_summary_ms(v) for k, v in results.c1.items()}
    fixed = {k: latency_summary_ms(v) for k, v in results.fixed.items()}
    base_c1, base_fixed = c1.get("direct"), fixed.get("direct")
    rows = []
    for name in results.meta.get("variants", []):
        a, b = c1.get(name), fixed.get(name)
        if a is None or b is None or base_c1 is None or base_fixed is None:
            continue
        rows.append([name, _ms(a["p50"]), _ms(a["p99"]), _ms(a["p50"] - base_c1["p50"]), _ms(a["p99"] - base_c1["p99"]),
                     _ms(b["p50"]), _ms(b["p99"]), _ms(b["p50"] - base_fixed["p50"]), _ms(b["p99"] - base_fixed["p99"]),
                     str(results.errors.get(name, 0))])
    return _table(["variant", "c=1 p50", "c=1 p99", "c=1 added p50", "c=1 added p99", "500/s p50", "500/s p99",
                   "500/s added p50", "500/s added p99", "errors"], rows)


def throughput_table(results: Results) -> list[str]:
    nginx = results.steps.get("nginx", [])
    rows = []
    for name in results.meta.get("variants", []):
        steps = results.steps.get(name, [])
        cells = [name]
        for bound in (1.0, 5.0, 10.0):
            rate = best_rate_under(steps, bound)
            floor = best_rate_under(nginx, bound)
            share = f" ({rate / floor:.0%} of nginx)" if floor and name != "nginx" else ""
            cells.append(f"{rate:.0f}{share}")
        peak = results.wrk.get(name)
        cells.append(f"{peak['calls_per_s']:.0f} (p99 {peak['p99']:.2f} ms, {peak['errors']:.0f} err)" if peak else "-")
        rows.append(cells)
    return _table(["variant", "calls/s, p99 < 1 ms", "calls/s, p99 < 5 ms", "calls/s, p99 < 10 ms",
                   "closed-loop peak, wrk -c32"], rows)


def steps_table(results: Results) -> list[str]:
    rows = []
    for name in results.meta.get("variants", []):
        for step in results.steps.get(name, []):
            rows.append([name, f"{step['rate']:.0f}", f"{step['achieved']:.0f}", _ms(step["p50"]), _ms(step["p99"]),
                         str(step["errors"]), str(step["connections"])])
    return _table(["variant", "offered/s", "achieved/s", "p50 ms", "p99 ms", "errors", "connections"], rows)


def cpu_table(results: Results) -> list[str]:
    rows = []
    for name in results.meta.get("variants", []):
        cpu = results.cpu.get(name)
        if cpu is None:
            continue
        if name == "direct":
            rows.append([name, "-", "-", "-"])
            continue
        total = cpu["proxy_ms_per_1000"] + cpu["policy_ms_per_1000"]
        rows.append([name, f"{cpu['proxy_ms_per_1000']:.0f}",
                     f"{cpu['policy_ms_per_1000']:.0f}" if name == "sidecar-rest" else "-", f"{total:.0f}"])
    return _table(["variant", "proxy process CPU-ms / 1,000 calls", "OPA server CPU-ms / 1,000 calls", "total"], rows)


def memory_table(results: Results) -> list[str]:
    rows = []
    for name in results.meta.get("variants", []):
        memory = results.memory.get(name, {})
        if name == "direct":
            continue
        tasks = (f"{memory['live_tasks_mib']:.1f} ({memory['live_tasks']} tasks opened, {memory['live_task_calls']} of them "
                 "called once)") if "live_tasks_mib" in memory else "-"
        inflight = "-"
        if "inflight_mib" in memory:
            answers = ", ".join(f"{n} answered {status}" for status, n in sorted(memory.get("inflight_statuses", {}).items()))
            inflight = (f"{memory['inflight_mib']:.1f} ({memory['inflight_sent']} sent, {memory['inflight_peak_open']} open at "
                        f"once, {memory['inflight_upstream_peak']} held at the upstream at once; {answers or 'none answered'})")
        rows.append([name, f"{memory.get('rest_mib', 0):.1f}", tasks, inflight])
    return _table(["variant", "RSS at rest, MiB", "RSS with live tasks, MiB", "RSS with calls in flight, MiB"], rows)


def micro_table(results: Results) -> list[str]:
    rows = [[step, f"{v['p50']:.1f}", f"{v['p90']:.1f}", f"{v['p99']:.1f}", f"{v['max']:.0f}", f"{int(v['count'])}"]
            for step, v in results.micro.items()]
    return _table(["step", "p50 µs", "p90 µs", "p99 µs", "max µs", "samples"], rows)


def targets(results: Results) -> list[dict[str, Any]]:
    c1 = {k: latency_summary_ms(v) for k, v in results.c1.items()}
    fixed = {k: latency_summary_ms(v) for k, v in results.fixed.items()}
    found: list[dict[str, Any]] = []

    def add(name: str, measured: float | None, limit: float, unit: str, at_least: bool = False) -> None:
        if measured is None:
            found.append({"target": name, "measured": "not measured", "met": False})
            return
        met = measured >= limit if at_least else measured <= limit
        found.append({"target": name, "measured": f"{measured:.3f} {unit}" if unit == "ms" else f"{measured:.1f} {unit}",
                      "met": met})

    def added(table: dict[str, dict[str, float]], name: str, key: str) -> float | None:
        if name in table and "direct" in table:
            return table[name][key] - table["direct"][key]
        return None

    add("added p50 at concurrency 1, embedded engine ≤ 0.5 ms", added(c1, "sidecar-embedded", "p50"), 0.5, "ms")
    add("added p50 at concurrency 1, REST engine ≤ 0.8 ms", added(c1, "sidecar-rest", "p50"), 0.8, "ms")
    for name in SIDECARS:
        add(f"added p99 at 500 calls/s, {name} ≤ 2 ms", added(fixed, name, "p99"), 2.0, "ms")
    add("≥ 2,000 allowed calls/s from one sidecar process with p99 < 5 ms (embedded)",
        best_rate_under(results.steps.get("sidecar-embedded", []), 5.0), 2000, "calls/s", at_least=True)
    for name in SIDECARS:
        cpu = results.cpu.get(name)
        add(f"≤ 500 CPU-ms per 1,000 allowed calls, policy included ({name})",
            cpu["proxy_ms_per_1000"] + cpu["policy_ms_per_1000"] if cpu else None, 500, "ms")
    for name in SIDECARS:
        memory = results.memory.get(name, {})
        worst = max([memory.get("live_tasks_mib", 0.0), memory.get("inflight_mib", 0.0)]) if memory else None
        add(f"≤ 150 MiB RSS with 10,000 live tasks or 10,000 calls in flight ({name})", worst, 150, "MiB")
    mint = results.micro.get("mint JWT (ES256)")
    add("signing ≤ 40 µs per token with a cached key (ES256 mint, p50)", mint["p50"] if mint else None, 40, "µs")
    policy = results.micro.get("policy evaluation (embedded)")
    add("embedded policy evaluation p99 ≤ 100 µs, shipped library, typical input", policy["p99"] if policy else None,
        100, "µs")
    return found


def targets_table(results: Results) -> list[str]:
    rows = [[t["target"], t["measured"], "met" if t["met"] else "**missed**"] for t in targets(results)]
    return _table(["target (issue 8)", "measured", ""], rows)


def render(results: Results, profile_name: str) -> str:
    lines = [BEGIN, "", f"## Latest run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} ({profile_name} profile, "
             f"{results.meta.get('duration_seconds', 0):.0f} s)", ""]
    lines += ["Machine: " + "; ".join(f"{k} {v}" for k, v in machine().items()) + ".", ""]
    lines += ["Versions: " + "; ".join(f"{k} {v}" for k, v in versions().items()) + ".", ""]
    lines += [f"Policy: {results.meta.get('policy')}. REST engine: the sidecar's OPA REST client talking to "
              "bench/opa_data_api.py, an OPA Data API server on top of the embedded engine in its own process "
              "(no `opa` binary can be installed here; a real `opa run --server` is not what was measured).", ""]
    lines += ["### Latency (ms; added = minus the direct call's same percentile)", "", *latency_table(results)]
    lines += ["### Throughput (open loop at rising offered rates; highest rate kept up with, without errors)", "",
              *throughput_table(results)]
    lines += ["### CPU per 1,000 calls at the fixed rate (utime + stime from /proc)", "", *cpu_table(results)]
    lines += ["### Memory (VmRSS from /proc)", "", *memory_table(results)]
    lines += ["### Request-path steps (micro-benchmark, in process)", "", *micro_table(results)]
    lines += ["### Targets", "", *targets_table(results)]
    lines += ["<details><summary>Every open-loop step</summary>", "", *steps_table(results), "</details>", ""]
    if results.notes:
        lines += ["Notes:", "", *(f"- {note}" for note in results.notes), ""]
    lines += [END]
    return "\n".join(lines)


def write_report(results: Results, *, profile_name: str, out: Path | None) -> str:
    section = render(results, profile_name)
    if out is not None:
        existing = out.read_text(encoding="utf-8") if out.exists() else ""
        if BEGIN in existing and END in existing:
            head, rest = existing.split(BEGIN, 1)
            tail = rest.split(END, 1)[1]
            text = head + section + tail
        else:
            text = "# Performance\n\n" + section + "\n" + existing
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    return section
