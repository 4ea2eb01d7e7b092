"""What one policy evaluation costs, in instructions: repeatable where wall time is not.

    python -m bench.policy_cost [--rego rego/] [--rule sidecar.authz.decision]

An evaluation is the one the sidecar runs (sidecar.policy.embedded._evaluate_on): the input as a
JsonDocument, serialised with orjson (sorted, compact: the bytes the sidecar hands the engine and
embeds in the audit record; serialised afresh for every evaluation here, so that cost is counted),
passed to the engine as those bytes, and the engine's answer parsed back as the sidecar parses it.
The engine is loaded as the sidecar loads it (sidecar.policy.embedded.set_runtime_data: the data
checked once, and what data alone decides set as data.sidecar.runtime.derived). One row evaluates
through the binding's public API instead (``engine.eval_document(rule, document)``, the standard
library's json both ways), as a tool using opa_bindings directly would; it is not what the sidecar runs.

This machine's timings vary by +-40% from run to run; valgrind's callgrind counts the instructions
a program executes, which are nearly the same on every run whatever else the machine does. Each figure
is (instructions with 105 evaluations - instructions with 5) / 100, so start-up and loading cancel out
(their count still varies by a few million instructions from run to run: over the 20 evaluations
this counted before, and bench.run still counts, that was up to +-0.2 M per evaluation; over 100 it
is +-0.05 M);
the Go garbage collector is off (GOGC=off) so its timing cannot move the count, and its share is
reported separately. Needs valgrind (Debian's package); takes about a minute per line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sidecar.context import build_input
from sidecar.jsoncodec import dumps_sorted

from .micro import AGENT, typical_call, typical_task

ROOT = Path(__file__).resolve().parent.parent

# Run under valgrind: load the policy as the sidecar does, then evaluate RULE N times.
EVALUATE = """
import sys
from pathlib import Path
from sidecar.jsoncodec import JsonDocument, loads
from sidecar.policy.embedded import _evaluate_on, new_engine, set_runtime_data
from sidecar.policy.loader import read_policy_dir
rego, rule, count, input_file, checked = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
public = sys.argv[6:7] == ["1"]  # through the binding's public API instead of the sidecar's path
bundle = read_policy_dir(Path(rego))
engine = new_engine(bundle)
if checked:
    set_runtime_data(engine, bundle, "sidecar/authz/decision")
document = loads(Path(input_file).read_bytes())
if public:
    for _ in range(count):
        engine.eval_document(rule, document)
else:
    for _ in range(count):
        _evaluate_on(engine, rule, JsonDocument(document))
"""


def instructions(rego: Path, rule: str, count: int, input_file: Path, *, checked: bool, gogc: str,
                 public: bool = False) -> int:
    # One P: Go threads spinning for work would add instructions that depend on timing.
    env = {**os.environ, "GOGC": gogc, "GOMAXPROCS": "1", "GODEBUG": "asyncpreemptoff=1", "PYTHONPATH": str(ROOT)}
    # Go's asynchronous preemption signals trip callgrind's signal handling; cooperative preemption does not.
    done = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-c",
                           EVALUATE, str(rego), rule, str(count), str(input_file), "1" if checked else "0",
                           "1" if public else "0"],
                          env=env, capture_output=True, text=True, check=True)
    for line in done.stderr.splitlines():
        if "Collected :" in line:
            return int(line.rsplit(":", 1)[1].strip())
    raise RuntimeError(f"no instruction count in valgrind's output: {done.stderr[-500:]}")


# Evaluations counted: (instructions with MANY - with FEW) / (MANY - FEW). A 25 - 5 count moved by
# 0.7 M between two runs of the same code (2.38 and 3.08 M); 105 - 5 stays within ~0.1 M.
FEW, MANY = 5, 105


def per_evaluation(rego: Path, rule: str, input_file: Path, *, checked: bool = True, gogc: str = "off",
                   public: bool = False, few: int = FEW, many: int = MANY) -> int:
    """(instructions with ``many`` evaluations - with ``few``) / (many - few): main() and bench.run alike."""
    low = instructions(rego, rule, few, input_file, checked=checked, gogc=gogc, public=public)
    high = instructions(rego, rule, many, input_file, checked=checked, gogc=gogc, public=public)
    return (high - low) // (many - few)


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
        typical.write_bytes(dumps_sorted(document))
        empty = Path(tmp) / "empty.json"
        empty.write_text("{}")
        rows = [
            ("decision, data checked at load (as the sidecar runs it)", args.rule, typical, True, "off", False),
            ("decision, data checked on every call (as an OPA server runs it)", args.rule, typical, False, "off",
             False),
            ("decision, GOGC=400 (the sidecar's setting; includes garbage collection)", args.rule, typical, True,
             "400", False),
            ("decision through the binding's public API (eval_document: the standard library's json both ways; "
             "not what the sidecar runs)", args.rule, typical, True, "off", True),
            ("a constant rule, same input (the binding's cost of passing the input)", "sidecar.authz.risk_levels",
             typical, True, "off", False),
            ("a constant rule, empty input (the binding's fixed cost)", "sidecar.authz.risk_levels", empty, True,
             "off", False),
        ]
        print(f"input {document['version']}: {len(dumps_sorted(document))} bytes of JSON "
              "(a GET inside a task with 20 recent calls)")
        print("| evaluation | instructions per evaluation |\n| --- | --- |")
        for label, rule, input_file, checked, gogc, public in rows:
            cost = per_evaluation(args.rego, rule, input_file, checked=checked, gogc=gogc, public=public)
            print(f"| {label} | {cost:,} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
