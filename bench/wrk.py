"""Closed-loop peak with wrk (C, one thread): the same mix of GETs and 1 KB POSTs inside tasks."""

from __future__ import annotations

import asyncio
import re
import shutil
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
    result = {"calls_per_s": 0.0, "p50": 0.0, "p99": 0.0, "errors": 0.0}
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if rps:
        result["calls_per_s"] = float(rps.group(1))
    for label, key in (("50%", "p50"), ("99%", "p99")):
        found = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
        if found:
            result[key] = float(found.group(1)) * UNITS[found.group(2)]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    result["errors"] = float(bad.group(1)) if bad else 0.0
    if errors:
        result["errors"] += sum(float(g) for g in errors.groups())
    return result


async def run_wrk(port: int, tasks: list[str], workdir: Path, *, connections: int, seconds: float) -> dict[str, float]:
    script = workdir / f"wrk-{port}.lua"
    script.write_text(lua_script(tasks))
    process = await asyncio.create_subprocess_exec(
        "wrk", "-t1", f"-c{connections}", f"-d{seconds:.0f}s", "--latency", "-s", str(script),
        f"http://127.0.0.1:{port}/", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await process.communicate()
    result = parse(output.decode(errors="replace"))
    result["connections"] = float(connections)
    return result
