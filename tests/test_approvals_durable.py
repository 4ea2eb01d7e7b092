"""SQLite keeps approvals across a kill -9: a real `agent-sidecar run --config` subprocess; records stored before
body previews existed still load from SQLite and Redis."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from approvals_support import APPROVAL_POLICY, ApproverIdP, approve, eventually
from harness import LISTENERS, EchoTool, free_port, sidecar_config
from sidecar.approvals.store import ApprovalStore, Verdict


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


def listener_url(config: dict[str, Any], listener: str) -> str:
    return f"http://{config['listeners'][listener]}"


async def start_process(config: dict[str, Any], config_path: Path, log_prefix: Path,
                        processes: list[SidecarProcess]) -> SidecarProcess:
    """`agent-sidecar run` on ``config`` (written to ``config_path``), ready. On the config's ports; where one was
    taken meanwhile (an outgoing connection of any test can take a port free_port() chose, a restarted sidecar's
    included), on fresh ones, written into ``config``: the state directory, and what is stored there, stay."""
    for attempt in range(5):
        config_path.write_text(yaml.safe_dump(config))
        process = SidecarProcess(config_path, log_prefix.with_name(f"{log_prefix.name}-{attempt}.log"))
        processes.append(process)
        process.start()
        try:
            await ready(listener_url(config, "metrics"), process)
            return process
        except AssertionError:
            if "address already in use" not in process.log_path.read_text() or attempt == 4:
                raise
        for listener in LISTENERS:
            config["listeners"][listener] = f"127.0.0.1:{free_port()}"
    raise AssertionError("unreachable")


async def test_an_approval_survives_kill_9_and_the_retry_goes_through(tmp_path: Path, echo_tool: EchoTool,
                                                                      processes: list[SidecarProcess]) -> None:
    idp = ApproverIdP(tmp_path)
    config = sidecar_config(tmp_path, echo_tool.base, policy_dir=APPROVAL_POLICY, approvals=idp.config())
    config_path = tmp_path / "sidecar.yaml"

    def url(listener: str) -> str:
        return listener_url(config, listener)

    async def started(name: str) -> SidecarProcess:
        return await start_process(config, config_path, tmp_path / name, processes)

    first = await started("first")
    async with httpx.AsyncClient() as agent:
        held = await agent.delete(f"{url('proxy')}/crm/customers/42")
    assert held.status_code == 403 and held.json()["code"] == "approval_required"
    approval_id = held.json()["approval_id"]
    first.kill_9()

    await started("second")
    async with httpx.AsyncClient() as client:
        shown = await client.get(f"{url('admin')}/v1/approvals/{approval_id}")
    assert shown.status_code == 200 and shown.json()["status"] == "pending"
    approved = await approve(url("admin"), approval_id, idp.token("alice@example.com", ["approvers"]))
    assert approved.status_code == 200, approved.text
    async with httpx.AsyncClient() as agent:
        response = await agent.delete(f"{url('proxy')}/crm/customers/42", headers={"X-Agent-Approval": approval_id})
    assert response.status_code == 200, response.text
    assert [s.path for s in echo_tool.seen] == ["/crm/customers/42"]


def _stored_before_previews(approval_id: str) -> str:
    """An approval as a sidecar from before body previews stored it: no ``body`` member."""
    now = time.time()
    return json.dumps({"id": approval_id, "binding": {"method": "DELETE", "target": "http://crm.example/crm/customers/9",
                                                      "body_sha256": hashlib.sha256(b"").hexdigest(), "agent": "agent-a",
                                                      "task_id": None},
                       "decision_id": "dec-old", "route": "crm", "reasons": ["old"], "risk": "high",
                       "approvers_required": 1, "group": None, "created_at": now, "expires_at": now + 600,
                       "status": "pending", "approvals": [], "denial": None, "intent": None, "used_at": None})


async def _loads_and_decides(store: ApprovalStore, approval_id: str) -> None:
    loaded = await store.get(approval_id)
    assert loaded is not None and loaded.body is None and loaded.public()["body"] is None
    assert [a.id for a in await store.list_pending()] == [approval_id]
    decided = await store.decide(approval_id, Verdict(approver="alice@example.com", groups=(), approve=True))
    assert decided.status == "approved" and decided.body is None
    assert await store.consume(approval_id)


async def test_sqlite_loads_a_record_stored_without_a_body_preview(tmp_path: Path) -> None:
    from sidecar.approvals.sqlite_store import SqliteApprovalStore

    path = tmp_path / "sidecar.db"
    store = SqliteApprovalStore(path)
    doc = _stored_before_previews("ap-before-previews")
    store._db.execute("INSERT INTO approvals (id, status, created_at, expires_at, doc) VALUES (?, 'pending', ?, ?, ?)",
                      ("ap-before-previews", json.loads(doc)["created_at"], json.loads(doc)["expires_at"], doc))
    await store.close()
    reopened = SqliteApprovalStore(path)
    try:
        await _loads_and_decides(reopened, "ap-before-previews")
    finally:
        await reopened.close()


async def test_redis_loads_a_record_stored_without_a_body_preview(redis_server: Any) -> None:
    import redis.asyncio as aioredis

    from sidecar.approvals.redis_store import RedisApprovalStore

    store = RedisApprovalStore(redis_server.url, prefix="old:")
    doc = _stored_before_previews("ap-before-previews")
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await client.set("old:approval:ap-before-previews", doc)
        await client.zadd("old:approvals:pending", {"ap-before-previews": json.loads(doc)["expires_at"]})
        await _loads_and_decides(store, "ap-before-previews")
    finally:
        await client.aclose()
        await store.close()
