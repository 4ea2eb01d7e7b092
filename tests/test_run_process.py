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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and hands the config over a memfd")
def test_a_handed_over_config_is_read_only_from_the_memfd_run_made(tmp_path: Path) -> None:
    """The variable that names the handed-over config, set by hand to another descriptor (here stdin, holding
    a pickle that would run a command), is refused before anything is read."""
    import os
    import pickle

    ran = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {ran}",))

    hostile = tmp_path / "hostile.pickle"
    hostile.write_bytes(pickle.dumps(Payload()))
    config = tmp_path / "sidecar.yaml"
    config.write_text(yaml.safe_dump(sidecar_config(tmp_path, "http://127.0.0.1:9")))
    with hostile.open("rb") as stdin:
        done = subprocess.run([*command(), "run", "--config", str(config)], stdin=stdin, capture_output=True, text=True,
                              env={**os.environ, "AGENT_SIDECAR_VALIDATED_CONFIG_FD": "0"}, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "AGENT_SIDECAR_VALIDATED_CONFIG_FD names no config handed over by agent-sidecar run" in done.stderr
    assert not ran.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="memfd seals are Linux's")
def test_an_unsealed_memfd_is_not_a_handed_over_config(tmp_path: Path) -> None:
    """Another process of the same user can open a memfd through /proc and rewrite it: the server reads
    only one sealed against writes, as agent-sidecar run makes it."""
    import os
    import pickle

    ran = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {ran}",))

    fd = os.memfd_create("agent-sidecar-config", 0)  # the right name, no seals
    os.write(fd, pickle.dumps(Payload()))
    os.lseek(fd, 0, os.SEEK_SET)
    config = tmp_path / "sidecar.yaml"
    config.write_text(yaml.safe_dump(sidecar_config(tmp_path, "http://127.0.0.1:9")))
    try:
        done = subprocess.run([*command(), "run", "--config", str(config)], capture_output=True, text=True,
                              env={**os.environ, "AGENT_SIDECAR_VALIDATED_CONFIG_FD": str(fd)}, pass_fds=(fd,),
                              timeout=60)
    finally:
        os.close(fd)
    assert done.returncode == 2, done.stderr
    assert "names no config handed over by agent-sidecar run" in done.stderr
    assert not ran.exists()
