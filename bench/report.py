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
from .wrk import wrk_summary

if TYPE_CHECKING:
    from .run import Results

BEGIN = "<!-- bench:begin (written by `make bench`; edits inside are overwritten) -->"
END = "<!-- bench:end -->"
SHIPPED = "sidecar-embedded"
ONE_RULE = "sidecar-one-rule"
FLOOR = "floor-shipped"  # bench.floor with the shipped library: evaluate, sign, forward, nothing else
MEASURED = (SHIPPED, ONE_RULE, FLOOR)


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


def with_floors(results: Results) -> list[str]:
    """The variants, then bench.floor's proxies (measured by wrk and at rest only)."""
    return [*results.meta.get("variants", []), *results.meta.get("floors", [])]


def wrk_table(results: Results) -> list[str]:
    one = {k: wrk_summary(v) for k, v in results.wrk_c1.items()}
    many = {k: wrk_summary(v) for k, v in results.wrk_c32.items()}
    base = one.get("direct")
    rows = []
    for name in with_floors(results):
        a, b = one.get(name), many.get(name)
        if not a or not b:
            continue
        added = _ms(a["p50"] - base["p50"]) if base else "-"
        cpu = f"{b['cpu_ms_per_1000']:.0f}" if name != "direct" and "cpu_ms_per_1000" in b else "-"
        rows.append([name, _ms(a["p50"]), _ms(a["p99"]), added, f"{a['calls_per_s']:.0f}", f"{b['allowed_per_s']:.0f}",
                     _ms(b["p50"]), _ms(b["p99"]), f"{b['non_2xx']:.0f} / {b['socket_errors']:.0f}", cpu])
    return _table(["variant", "c=1 p50", "c=1 p99", "c=1 added p50", "c=1 calls/s", "c=32 allowed calls/s", "c=32 p50",
                   "c=32 p99", "c=32 non-2xx / socket errors", "c=32 CPU-ms / 1,000 allowed calls"], rows)


def wrk_rounds_table(results: Results) -> list[str]:
    rows = []
    for name in with_floors(results):
        for number, (one, many) in enumerate(zip(results.wrk_c1.get(name, []), results.wrk_c32.get(name, []))):
            cpu = (many.get("proxy_cpu_ms", 0.0) + many.get("policy_cpu_ms", 0.0)) * 1000 / max(many["allowed"], 1.0)
            rows.append([name, str(number + 1), _ms(one["p50"]), _ms(one["p99"]), f"{many['allowed_per_s']:.0f}",
                         _ms(many["p99"]), f"{cpu:.0f}" if name != "direct" else "-"])
    return _table(["variant", "round", "c=1 p50 ms", "c=1 p99 ms", "c=32 allowed calls/s", "c=32 p99 ms",
                   "c=32 CPU-ms / 1,000 allowed"], rows)


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
        peak = wrk_summary(results.wrk_c32.get(name, []))
        cells.append(f"{peak['allowed_per_s']:.0f} (p99 {peak['p99']:.2f} ms, {peak['errors']:.0f} err)" if peak else "-")
        rows.append(cells)
    return _table(["variant", "calls/s, p99 < 1 ms", "calls/s, p99 < 5 ms", "calls/s, p99 < 10 ms",
                   "closed-loop peak, wrk -c32 (allowed calls/s)"], rows)


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
        peak = wrk_summary(results.wrk_c32.get(name, []))
        if name == "direct":
            rows.append([name, "-", "-", "-", "-", "-"])
            continue
        rest = name == "sidecar-rest"
        fixed = [f"{cpu['proxy_ms_per_1000']:.0f}", f"{cpu['policy_ms_per_1000']:.0f}" if rest else "-",
                 f"{cpu['proxy_ms_per_1000'] + cpu['policy_ms_per_1000']:.0f} ({cpu['allowed']:.0f} allowed)"] \
            if cpu else ["-", "-", "-"]
        closed = [f"{peak['proxy_cpu_ms_per_1000']:.0f}", f"{peak['cpu_ms_per_1000']:.0f} ({peak['allowed']:.0f} allowed)"] \
            if "cpu_ms_per_1000" in peak else ["-", "-"]
        rows.append([name, *fixed, *closed])
    rate = f"{results.meta.get('fixed_rate', 500):.0f}/s"
    return _table(["variant", f"{rate}: proxy process", f"{rate}: OPA server", f"{rate}: total", "wrk -c32: proxy process",
                   "wrk -c32: total"], rows)


def memory_table(results: Results) -> list[str]:
    rows = []
    for name in with_floors(results):
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


def soak_table(results: Results) -> list[str]:
    rows = []
    for name in results.meta.get("variants", []):
        soak = results.soak.get(name)
        if soak is None:
            continue
        verdict = "**pass**" if soak["passed"] else "**fail**"
        rows.append([name, f"{soak['calls']} at c={soak['concurrency']}: {soak['calls'] - soak['errors']} answered 2xx, "
                     f"{soak['errors']} refused or failed",
                     f"{soak['calls_per_s']:.0f}", f"{soak['cpu_ms_per_1000_allowed']:.0f}",
                     f"{soak['rss_before_mib']:.1f} → {soak['rss_peak_mib']:.1f} → {soak['rss_after_mib']:.1f} "
                     f"({_change(soak['rss_after_mib'], soak['rss_before_mib'])})",
                     f"{soak['fds_before']} → {soak['fds_peak']} → {soak['fds_after']} "
                     f"({_change(soak['fds_after'], soak['fds_before'])})",
                     f"{soak['settle_seconds']:.1f} s", verdict])
    return _table(["variant", "calls", "calls/s", "CPU-ms / 1,000 allowed", "RSS MiB: before → peak → after",
                   "open fds: before → peak → after", "settled after", "back within 10 %"], rows)


def _change(after: float, before: float) -> str:
    return f"{(after - before) / before:+.1%}" if before else "-"


def instructions_table(results: Results) -> list[str]:
    counted = results.instructions
    rows = []
    for name in (SHIPPED, ONE_RULE):
        if name in counted:
            value = counted[name]
            rows.append([name, f"{value:,}" if isinstance(value, int) else "failed: " + counted.get("errors", {}).get(name, "")])
    lines = [f"Source: {counted.get('source', 'not measured')}."]
    if "input_bytes" in counted:
        lines[0] += f" Typical input: {counted['input_bytes']:,} bytes of JSON; {counted.get('seconds', 0):.0f} s."
    return [*lines, "", *(_table(["policy", "instructions per evaluation"], rows) if rows else [])]


def micro_table(results: Results) -> list[str]:
    rows = [[step, f"{v['p50']:.1f}", f"{v['p90']:.1f}", f"{v['p99']:.1f}", f"{v['max']:.0f}", f"{int(v['count'])}"]
            for step, v in results.micro.items()]
    return _table(["step", "p50 µs", "p90 µs", "p99 µs", "max µs", "samples"], rows)


def _missed(measured: float, limit: float, unit: str, at_least: bool) -> str:
    """How far a figure is from its limit, in the limit's unit and as a ratio."""
    if at_least:
        return f"{limit - measured:,.0f} {unit} short ({measured / limit:.0%} of the target)"
    ratio = f"{measured / limit:.3g}×" if limit else "-"
    return f"over by {_fmt(measured - limit, unit)} ({ratio} the target)"


def _fmt(value: float, unit: str) -> str:
    if unit == "ms":
        return f"{value:.3f} ms"
    if unit == "M instructions":
        return f"{value:.2f} M instructions"
    if unit == "MiB":
        return f"{value:.1f} MiB"
    if unit == "CPU-ms":
        return f"{value:,.0f} CPU-ms"
    return f"{value:,.0f} {unit}"


def targets(results: Results) -> list[dict[str, Any]]:
    """Issue 17's targets, each judged on the shipped library's figure; the one-rule policy's figure beside it."""
    one = {k: wrk_summary(v) for k, v in results.wrk_c1.items()}
    many = {k: wrk_summary(v) for k, v in results.wrk_c32.items()}
    found: list[dict[str, Any]] = []

    def figure(name: str, value: float | None, unit: str) -> str:
        return "not measured" if value is None else _fmt(value, unit)

    def add(target: str, values: dict[str, float | None], limit: float, unit: str, at_least: bool = False) -> None:
        measured = values.get(SHIPPED)
        if measured is None:
            met, verdict = False, "**not measured**"
        else:
            met = measured >= limit if at_least else measured <= limit
            verdict = "met" if met else f"**missed**: {_missed(measured, limit, unit, at_least)}"
        found.append({"target": target, "measured": figure(SHIPPED, measured, unit), "met": met, "verdict": verdict,
                      "one_rule": figure(ONE_RULE, values.get(ONE_RULE), unit),
                      "floor": figure(FLOOR, values.get(FLOOR), unit) if FLOOR in values else "-"})

    def added_p50(name: str) -> float | None:
        if one.get(name) and one.get("direct"):
            return one[name]["p50"] - one["direct"]["p50"]
        return None

    add("added p50 at concurrency 1 ≤ 1.0 ms (wrk -t1 -c1, minus the direct call's)",
        {name: added_p50(name) for name in MEASURED}, 1.0, "ms")

    # Calls/s and p99 at concurrency 32 are one target: both must hold in the same runs.
    entry: dict[str, Any] = {"target": "≥ 1,500 allowed calls/s from one sidecar process at concurrency 32, p99 < 20 ms "
                             "(wrk -t1 -c32)"}
    cells = {}
    for name in MEASURED:
        peak = many.get(name)
        cells[name] = f"{peak['allowed_per_s']:,.0f} calls/s, p99 {peak['p99']:.1f} ms" if peak else "not measured"
    entry["measured"], entry["one_rule"], entry["floor"] = cells[SHIPPED], cells[ONE_RULE], cells[FLOOR]
    peak = many.get(SHIPPED)
    if not peak:
        entry.update(met=False, verdict="**not measured**")
    else:
        rate_ok, p99_ok = peak["allowed_per_s"] >= 1500, peak["p99"] < 20
        entry["met"] = rate_ok and p99_ok
        misses = ([] if rate_ok else [_missed(peak["allowed_per_s"], 1500, "calls/s", True)]) + \
                 ([] if p99_ok else [f"p99 {_missed(peak['p99'], 20, 'ms', False)}"])
        entry["verdict"] = "met" if entry["met"] else "**missed**: " + "; ".join(misses)
    found.append(entry)

    add("≤ 700 CPU-ms per 1,000 allowed calls (the sidecar process, over the wrk -c32 runs)",
        {name: many[name].get("cpu_ms_per_1000") if many.get(name) else None for name in MEASURED}, 700, "CPU-ms")
    add("RSS at rest ≤ 90 MiB", {name: results.memory.get(name, {}).get("rest_mib") for name in MEASURED},
        90, "MiB")
    add("RSS with 10,000 live tasks ≤ 150 MiB",
        {name: results.memory.get(name, {}).get("live_tasks_mib") for name in (SHIPPED, ONE_RULE)}, 150, "MiB")

    def millions(name: str) -> float | None:
        value = results.instructions.get(name)
        return value / 1e6 if isinstance(value, int) else None

    add("one evaluation of the policy on the typical input ≤ 3.0 M instructions (bench.policy_cost)",
        {name: millions(name) for name in (SHIPPED, ONE_RULE)}, 3.0, "M instructions")

    soak_entry: dict[str, Any] = {"target": "after 20,000 calls at concurrency 64, RSS and open fds back within 10 % "
                                  "of before", "floor": "-"}
    for key, name in (("measured", SHIPPED), ("one_rule", ONE_RULE)):
        soak = results.soak.get(name)
        soak_entry[key] = (f"RSS {_change(soak['rss_after_mib'], soak['rss_before_mib'])}, fds "
                           f"{_change(soak['fds_after'], soak['fds_before'])} after {soak['calls']:,} calls"
                           if soak else "not measured")
    soak = results.soak.get(SHIPPED)
    soak_entry["met"] = bool(soak and soak["passed"])
    if not soak:
        soak_entry["verdict"] = "**not measured**"
    elif soak["passed"]:
        soak_entry["verdict"] = "met"
    else:
        why = [what for what, ok in (("RSS", soak["rss_back"]), ("open fds", soak["fds_back"])) if not ok]
        if soak["calls"] < soak["wanted_calls"]:
            why.append(f"only {soak['calls']:,} of {soak['wanted_calls']:,} calls in time")
        soak_entry["verdict"] = "**missed**: " + ", ".join(why)
    found.append(soak_entry)
    return found


def targets_table(results: Results) -> list[str]:
    rows = [[t["target"], t["measured"], t["verdict"], t["one_rule"], t["floor"]] for t in targets(results)]
    return _table(["target (issue 17)", f"{SHIPPED} (the shipped library)", "", f"{ONE_RULE} (the path alone)",
                   f"{FLOOR} (the least a Python path must do: evaluate the shipped library, sign, forward)"], rows)


def render(results: Results, profile_name: str) -> str:
    lines = [BEGIN, "", f"## Latest run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} ({profile_name} profile, "
             f"{results.meta.get('duration_seconds', 0):.0f} s)", ""]
    lines += ["Machine: " + "; ".join(f"{k} {v}" for k, v in machine().items()) + ".", ""]
    lines += ["Versions: " + "; ".join(f"{k} {v}" for k, v in versions().items()) + ".", ""]
    rule = (results.meta.get("one_rule_policy") or "-").splitlines()[-1]
    lines += [f"Policy: `{SHIPPED}` and `sidecar-rest` run {results.meta.get('policy')}; `{ONE_RULE}` runs a one-rule "
              f"policy that always allows (`{rule}`), so its figures "
              "are the cost of the sidecar's path without the policy's. Same workload, minting (ES256) and audit chain "
              "for all three. REST engine: the sidecar's OPA REST client talking to bench/opa_data_api.py, an OPA Data "
              "API server on top of the embedded engine in its own process (no `opa` binary can be installed here; a "
              "real `opa run --server` is not what was measured).", ""]
    if results.meta.get("floors"):
        lines += [f"Floor: `{FLOOR}` and `floor-one-rule` are bench/floor.py, the least a Python request path around this "
                  "engine must do: the request read by a protocol of its own, the same policy evaluated as the sidecar "
                  "evaluates it (on engine threads of its own), an ES256 credential signed, the call forwarded over a "
                  "kept-alive connection; no task store, no audit chain, no checks. Measured by wrk and at rest, in the "
                  "same rounds. A target this floor misses is out of reach of any Python path around this engine and "
                  "policy on this machine.", ""]
    lines += ["### Targets", "", *targets_table(results)]
    lines += ["### wrk -t1: latency at concurrency 1, allowed calls/s at concurrency 32 (ms; medians of the rounds)", "",
              *wrk_table(results)]
    lines += ["### Latency, load generator (ms; added = minus the direct call's same percentile)", "",
              *latency_table(results)]
    lines += ["### Throughput (open loop at rising offered rates; highest rate kept up with, without errors)", "",
              *throughput_table(results)]
    lines += ["### CPU-ms per 1,000 allowed calls (utime + stime from /proc)", "", *cpu_table(results)]
    lines += ["### Memory (VmRSS from /proc)", "", *memory_table(results)]
    lines += ["### Soak (RSS and open file descriptors before, at the peak, and after settling)", "",
              *soak_table(results)]
    lines += ["### One evaluation in instructions (callgrind)", "", *instructions_table(results)]
    lines += ["### Request-path steps (micro-benchmark, in process)", "", *micro_table(results)]
    lines += ["<details><summary>Every wrk round</summary>", "", *wrk_rounds_table(results), "</details>", ""]
    lines += ["<details><summary>Every open-loop step</summary>", "", *steps_table(results), "</details>", ""]
    if results.phases:
        lines += ["Phases: " + "; ".join(f"{title} {seconds:.0f} s" for title, seconds in results.phases.items()) + ".", ""]
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
