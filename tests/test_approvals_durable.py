"""SQLite keeps approvals across a kill -9: a real `agent-sidecar run --config` subprocess."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from approvals_support import APPROVAL_POLICY, ApproverIdP, approve, eventually
from harness import EchoTool, sidecar_config


def command() -> list[str]:
    script = Path(sys.executable).parent / "agent-sidecar"
    found = str(script) if script.exists() else shutil.which("agent-sidecar")
    return [found] if found else [sys.executable, "-m", "sidecar"]


class SidecarProcess:
    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen([*command(), "run", "--config", str(self.config_path)],
                                            stdout=log, stderr=subprocess.STDOUT)

    def kill_9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        assert self.process.returncode == -signal.SIGKILL

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


@pytest.fixture
def processes() -> Iterator[list[SidecarProcess]]:
    started: list[SidecarProcess] = []
    yield started
    for process in started:
        process.stop()


async def ready(metrics: str, process: SidecarProcess) -> None:
    async def probe() -> bool:
        assert process.process is not None
        if process.process.poll() is not None:
            raise AssertionError(f"sidecar exited: {process.log_path.read_text()[-2000:]}")
        try:
            async with httpx.AsyncClient() as client:
                return (await client.get(f"{metrics}/readyz")).status_code == 200
        except httpx.HTTPError:
            return False
    await eventually(probe, deadline=60, what="the sidecar subprocess to be ready")


async def test_an_approval_survives_kill_9_and_the_retry_goes_through(tmp_path: Path, echo_tool: EchoTool,
                                                                      processes: list[SidecarProcess]) -> None:
    idp = ApproverIdP(tmp_path)
    config = sidecar_config(tmp_path, echo_tool.base, policy_dir=APPROVAL_POLICY, approvals=idp.config())
    config_path = tmp_path / "sidecar.yaml"
    config_path.write_text(yaml.safe_dump(config))
    proxy = f"http://{config['listeners']['proxy']}"
    admin = f"http://{config['listeners']['admin']}"
    metrics = f"http://{config['listeners']['metrics']}"

    async def started(name: str) -> SidecarProcess:
        process = SidecarProcess(config_path, tmp_path / f"{name}.log")
        processes.append(process)
        process.start()
        await ready(metrics, process)
        return process

    first = await started("first")
    async with httpx.AsyncClient() as agent:
        held = await agent.delete(f"{proxy}/crm/customers/42")
    assert held.status_code == 403 and held.json()["code"] == "approval_required"
    approval_id = held.json()["approval_id"]
    first.kill_9()

    await started("second")
    async with httpx.AsyncClient() as client:
        shown = await client.get(f"{admin}/v1/approvals/{approval_id}")
    assert shown.status_code == 200 and shown.json()["status"] == "pending"
    approved = await approve(admin, approval_id, idp.token("alice@example.com", ["approvers"]))
    assert approved.status_code == 200, approved.text
    async with httpx.AsyncClient() as agent:
        response = await agent.delete(f"{proxy}/crm/customers/42", headers={"X-Agent-Approval": approval_id})
    assert response.status_code == 200, response.text
    assert [s.path for s in echo_tool.seen] == ["/crm/customers/42"]
