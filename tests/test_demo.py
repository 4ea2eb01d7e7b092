"""`make run`'s demo, played once against the shipped rego/ library and examples/sidecar.yaml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from harness import ROOT, free_port


def test_demo_shows_an_allowed_a_denied_and_a_held_call(tmp_path: Path) -> None:
    config = yaml.safe_load((ROOT / "examples" / "sidecar.yaml").read_text())
    tool_port = free_port()
    config["listeners"] = {name: f"127.0.0.1:{free_port()}" for name in ("proxy", "admin", "metrics")}
    config["state_dir"] = str(tmp_path / "state")
    config["policy"]["rego_dir"] = str(ROOT / "rego")
    for route in config["routes"]:
        route["upstream"] = route["upstream"].replace(":18080", f":{tool_port}")
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "sidecar.demo", "--once", "--config", str(path),
                             "--tool-port", str(tool_port)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    allowed, denied, held = out.split("=== ")[1:4]
    assert allowed.startswith("1. allowed") and "HTTP 200" in allowed
    assert '"credential": "a sidecar-minted JWT"' in allowed
    assert '"agent\'s own secret reached the tool": false' in allowed
    assert denied.startswith("2. denied") and "HTTP 403" in denied and '"code": "denied"' in denied
    assert "writes need a task" in denied
    assert held.startswith("3. held") and '"code": "approval_required"' in held and '"approval_id": "ap-' in held
