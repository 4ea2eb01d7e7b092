"""`agent-sidecar run`: the long-running process holds only what serving needs (issue 17, docs/performance.md).

The config is validated (pydantic) in the process the operator starts, which then execs the server
and hands it the validated config; the server never imports pydantic (its C extension would be mapped).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from harness import sidecar_config


def command() -> list[str]:
    script = Path(sys.executable).parent / "agent-sidecar"
    found = str(script) if script.exists() else shutil.which("agent-sidecar")
    return [found] if found else [sys.executable, "-m", "sidecar"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and hands the config over a memfd")
def test_the_server_process_never_imports_pydantic(tmp_path: Path) -> None:
    config = sidecar_config(tmp_path, "http://127.0.0.1:9")
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config))
    metrics = f"http://{config['listeners']['metrics']}"
    log = tmp_path / "sidecar.log"
    with log.open("wb") as out:
        process = subprocess.Popen([*command(), "run", "--config", str(path)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log.read_text()[-2000:]
            try:
                if httpx.get(f"{metrics}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the sidecar did not become ready"
            time.sleep(0.1)
        # The same PID (exec keeps it), now the server: no pydantic_core extension mapped, and no
        # descriptor left open on the handed-over config.
        maps = Path(f"/proc/{process.pid}/maps").read_text()
        assert "pydantic" not in maps
        assert not any("agent-sidecar-config" in str(fd.readlink()) for fd in Path(f"/proc/{process.pid}/fd").iterdir()
                       if fd.is_symlink())
    finally:
        process.terminate()
        process.wait(timeout=30)
