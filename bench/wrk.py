"""wrk (C, one thread) with the same mix of GETs and 1 KB POSTs inside tasks: -c1 for latency, -c32 for the peak.

Latency percentiles are wrk's own (every answer, whatever its status); "allowed" calls are the answers
with a 2xx status, so a proxy that refuses part of the load is not credited with it.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import statistics
from pathlib import Path

from .loadgen import GET_SHARE, post_body

UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def lua_script(tasks: list[str]) -> str:
    task_list = ", ".join(f'"{task}"' for task in tasks) or '"none"'
    body = post_body(1).decode()
    return f"""
local tasks = {{ {task_list} }}
local body = '{body}'
local n = 0
request = function()
  n = n + 1
  local task = tasks[(n % #tasks) + 1]
  local customer = math.random(1, 999)
  if math.random() < {GET_SHARE} then
    return wrk.format("GET", "/crm/customers/" .. customer, {{["X-Agent-Task"] = task, ["Accept"] = "application/json"}})
  end
  return wrk.format("POST", "/crm/customers/" .. customer .. "/notes",
    {{["X-Agent-Task"] = task, ["Content-Type"] = "application/json"}}, body)
end
"""


def parse(output: str) -> dict[str, float]:
    """wrk's summary as numbers: calls/s, allowed (2xx) calls/s, p50/p99 in ms, totals and errors."""
    result = {"calls_per_s": 0.0, "allowed_per_s": 0.0, "p50": 0.0, "p99": 0.0, "errors": 0.0, "requests": 0.0,
              "allowed": 0.0, "non_2xx": 0.0, "socket_errors": 0.0, "seconds": 0.0}
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if rps:
        result["calls_per_s"] = float(rps.group(1))
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)\b", output)
    if total:
        result["requests"] = float(total.group(1))
        result["seconds"] = float(total.group(2)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[total.group(3)]
    for label, key in (("50%", "p50"), ("99%", "p99")):
        found = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
        if found:
            result[key] = float(found.group(1)) * UNITS[found.group(2)]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    result["non_2xx"] = float(bad.group(1)) if bad else 0.0
    result["socket_errors"] = sum(float(g) for g in errors.groups()) if errors else 0.0
    result["errors"] = result["non_2xx"] + result["socket_errors"]
    result["allowed"] = max(0.0, result["requests"] - result["non_2xx"])
    if result["seconds"] > 0:
        result["allowed_per_s"] = result["allowed"] / result["seconds"]
    return result


async def run_wrk(port: int, tasks: list[str], workdir: Path, *, connections: int, seconds: float) -> dict[str, float]:
    script = workdir / f"wrk-{port}.lua"
    script.write_text(lua_script(tasks))
    process = await asyncio.create_subprocess_exec(
        "wrk", "-t1", f"-c{connections}", f"-d{seconds:.0f}s", "--latency", "-s", str(script),
        f"http://127.0.0.1:{port}/", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await process.communicate()
    text = output.decode(errors="replace")
    if process.returncode != 0 or "requests in" not in text:
        raise RuntimeError(f"wrk failed (exit {process.returncode}): {text[-500:]}")
    result = parse(text)
    result["connections"] = float(connections)
    return result


def wrk_summary(runs: list[dict[str, float]]) -> dict[str, float]:
    """Several rounds of one variant: the median of each rate and percentile, the sum of each count.

    CPU (``proxy_cpu_ms`` and ``policy_cpu_ms``, when the runner measured them around each run) is
    divided by the allowed calls of the same runs: CPU-ms per 1,000 allowed calls.
    """
    if not runs:
        return {}
    found = {key: statistics.median(run.get(key, 0.0) for run in runs)
             for key in ("calls_per_s", "allowed_per_s", "p50", "p99")}
    for key in ("requests", "allowed", "non_2xx", "socket_errors", "errors", "seconds", "proxy_cpu_ms", "policy_cpu_ms"):
        found[key] = sum(run.get(key, 0.0) for run in runs)
    found["rounds"] = float(len(runs))
    found["p99_worst"] = max(run.get("p99", 0.0) for run in runs)
    if found["allowed"] > 0:
        found["proxy_cpu_ms_per_1000"] = found["proxy_cpu_ms"] * 1000 / found["allowed"]
        found["policy_cpu_ms_per_1000"] = found["policy_cpu_ms"] * 1000 / found["allowed"]
        found["cpu_ms_per_1000"] = found["proxy_cpu_ms_per_1000"] + found["policy_cpu_ms_per_1000"]
    return found
