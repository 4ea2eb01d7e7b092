"""What one policy evaluation costs, in instructions: repeatable where wall time is not.

    python -m bench.policy_cost [--rego rego/] [--rule sidecar.authz.decision]

This machine's timings vary by +-40% from run to run; valgrind's callgrind counts the instructions
a program executes, which are the same on every run whatever else the machine does. Each figure is
(instructions with 25 evaluations - instructions with 5) / 20, so start-up and loading cancel out;
the Go garbage collector is off (GOGC=off) so its timing cannot move the count, and its share is
reported separately. Needs valgrind (Debian's package); takes about a minute per line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sidecar.context import build_input

from .micro import AGENT, typical_call, typical_task

ROOT = Path(__file__).resolve().parent.parent

# Run under valgrind: load the policy as the sidecar does, then evaluate RULE N times.
EVALUATE = """
import json, sys
from pathlib import Path
from sidecar.policy.embedded import CONFIG_CHECKED_PATH, check_data_once, new_engine
from sidecar.policy.loader import read_policy_dir
rego, rule, count, input_file, checked = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
bundle = read_policy_dir(Path(rego))
engine = new_engine(bundle)
if checked and check_data_once(engine, bundle, "sidecar/authz/decision"):
    engine.add_data(True, CONFIG_CHECKED_PATH)
document = json.loads(Path(input_file).read_text())
for _ in range(count):
    engine.eval_document(rule, document)
"""


def instructions(rego: Path, rule: str, count: int, input_file: Path, *, checked: bool, gogc: str) -> int:
    # One P: Go threads spinning for work would add instructions that depend on timing.
    env = {**os.environ, "GOGC": gogc, "GOMAXPROCS": "1", "GODEBUG": "asyncpreemptoff=1", "PYTHONPATH": str(ROOT)}
    # Go's asynchronous preemption signals trip callgrind's signal handling; cooperative preemption does not.
    done = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-c",
                           EVALUATE, str(rego), rule, str(count), str(input_file), "1" if checked else "0"],
                          env=env, capture_output=True, text=True, check=True)
    for line in done.stderr.splitlines():
        if "Collected :" in line:
            return int(line.rsplit(":", 1)[1].strip())
    raise RuntimeError(f"no instruction count in valgrind's output: {done.stderr[-500:]}")


def per_evaluation(rego: Path, rule: str, input_file: Path, *, checked: bool = True, gogc: str = "off") -> int:
    few = instructions(rego, rule, 5, input_file, checked=checked, gogc=gogc)
    many = instructions(rego, rule, 25, input_file, checked=checked, gogc=gogc)
    return (many - few) // 20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rego", type=Path, default=ROOT / "rego")
    parser.add_argument("--rule", default="sidecar.authz.decision")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("bench.policy_cost: valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="policy-cost-") as tmp:
        typical = Path(tmp) / "typical.json"
        document = build_input(typical_call(), AGENT, typical_task(time.time()))
        typical.write_text(json.dumps(document))
        empty = Path(tmp) / "empty.json"
        empty.write_text("{}")
        rows = [
            ("decision, data checked at load (as the sidecar runs it)", args.rule, typical, True, "off"),
            ("decision, data checked on every call (as an OPA server runs it)", args.rule, typical, False, "off"),
            ("decision, GOGC=400 (the sidecar's setting; includes garbage collection)", args.rule, typical, True, "400"),
            ("a constant rule, same input (the binding's cost of passing the input)", "sidecar.authz.risk_levels",
             typical, True, "off"),
            ("a constant rule, empty input (the binding's fixed cost)", "sidecar.authz.risk_levels", empty, True, "off"),
        ]
        print(f"input {document['version']}: {len(json.dumps(document))} bytes of JSON "
              "(a GET inside a task with 20 recent calls)")
        print("| evaluation | instructions per evaluation |\n| --- | --- |")
        for label, rule, input_file, checked, gogc in rows:
            print(f"| {label} | {per_evaluation(args.rego, rule, input_file, checked=checked, gogc=gogc):,} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
