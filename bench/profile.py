"""Where the sidecar's time goes: py-spy on the sidecar process under a fixed-rate load.

    python -m bench.profile [--engine embedded|rest] [--rate 300] [--seconds 15]

Starts the upstream and one sidecar (the shipped rego/ library), drives the benchmark's mix at a fixed
rate from the load generator process, samples the sidecar with ``py-spy record --format raw`` (with
native frames, so time spent in the OPA Go engine shows up) and prints the hottest functions by
inclusive and by self time. py-spy comes from PyPI (``pip install py-spy``); it needs ptrace rights.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

from .procs import LoadGen, open_tasks, start_opa_data_api, start_sidecar, start_upstream, wait_for_port
from .run import pick_policy


def summarize(raw: Path, top: int) -> str:
    """Collapsed stacks ("frame;frame;frame count") to the hottest frames, inclusive and self."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [frame.split(" (")[0] + " (" + frame.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")"
                  if " (" in frame else frame for frame in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    lines = [f"{total} samples", "", "inclusive:"]
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in inclusive.most_common(top)]
    lines += ["", "self:"]
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    return "\n".join(lines)


async def profile(engine: str, rate: float, seconds: float, top: int, keep: Path | None) -> None:
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if py_spy is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    rego_dir, note = pick_policy()
    print(f"policy: {note}", file=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="agent-sidecar-profile-"))
    upstream, upstream_port = start_upstream(workdir, 2.0)
    procs = [upstream]
    loadgen: LoadGen | None = None
    try:
        await wait_for_port(upstream, upstream_port)
        rest_url = None
        if engine == "rest":
            opa, opa_port = start_opa_data_api(workdir, rego_dir)
            procs.append(opa)
            await wait_for_port(opa, opa_port)
            rest_url = f"http://127.0.0.1:{opa_port}"
        sidecar = await start_sidecar(workdir, f"sidecar-{engine}", upstream_port, rego_dir, engine, rest_url)
        procs.append(sidecar.proc)
        tasks = await open_tasks(sidecar.admin_port, max(200, int(rate)))
        loadgen = await LoadGen.start()
        job = {"host": "127.0.0.1", "port": sidecar.proxy_port, "tasks": tasks}
        await loadgen.run(op="closed", count=len(tasks), concurrency=8, **job)
        raw = workdir / "profile.txt"
        spy = await asyncio.create_subprocess_exec(
            py_spy, "record", "--pid", str(sidecar.proc.pid), "--duration", str(int(seconds)), "--rate", "250",
            "--native", "--format", "raw", "--output", str(raw),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        result = await loadgen.run(op="rate", rate=rate, duration=seconds + 1, max_connections=256, **job)
        _, err = await spy.communicate()
        if not raw.exists():
            raise SystemExit(f"py-spy wrote nothing: {err.decode(errors='replace')[-500:]}")
        print(f"{result['count']} calls at {rate:.0f}/s offered, {result['achieved']:.0f}/s achieved, "
              f"{result['errors']} errors")
        print(summarize(raw, top))
        if keep is not None:
            shutil.copy(raw, keep)
    finally:
        if loadgen is not None:
            await loadgen.stop()
        for proc in reversed(procs):
            proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=("embedded", "rest"), default="embedded")
    parser.add_argument("--rate", type=float, default=300)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--keep", type=Path, default=None, help="copy the collapsed stacks here")
    args = parser.parse_args()
    asyncio.run(profile(args.engine, args.rate, args.seconds, args.top, args.keep))


if __name__ == "__main__":
    main()
