"""An OPA REST Data API server on top of the embedded engine, for the REST-engine variant.

No ``opa`` binary can be installed on this machine, so this process stands in for the OPA
container: it serves ``POST /v1/data/<path>`` and ``GET /health`` exactly as the tests'
OpaDataApiServer does (tests/harness.py), on a port of our choosing, in its own process.
A real ``opa run --server`` is Go and answers faster; the report says which one was measured.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from harness import OpaDataApiServer  # noqa: E402


async def serve(rego_dir: Path, port: int) -> None:
    await OpaDataApiServer(rego_dir).start(port)
    print("ready", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rego", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.rego, args.port))


if __name__ == "__main__":
    main()
