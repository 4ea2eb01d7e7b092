from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import EchoTool, RunningSidecar, SidecarFactory, sidecar_config, start_sidecar  # noqa: E402


@pytest.fixture
async def echo_tool() -> AsyncIterator[EchoTool]:
    tool = EchoTool()
    await tool.start()
    yield tool
    await tool.stop()


@pytest.fixture
async def make_sidecar(tmp_path: Path, echo_tool: EchoTool) -> AsyncIterator[SidecarFactory]:
    started: list[RunningSidecar] = []

    async def factory(**options: Any) -> RunningSidecar:
        config = sidecar_config(tmp_path, echo_tool.base, **options)
        running = await start_sidecar(tmp_path, config)
        started.append(running)
        return running

    yield factory
    for running in started:
        await running.sidecar.stop()


@pytest.fixture
async def sidecar(make_sidecar: SidecarFactory) -> RunningSidecar:
    return await make_sidecar()


@pytest.fixture
async def gate_tool() -> AsyncIterator[Any]:
    """An upstream that holds calls at a gate the test opens (tests/task_concurrency_support.py)."""
    from task_concurrency_support import GateTool

    tool = GateTool()
    await tool.start()
    yield tool
    await tool.stop()


@pytest.fixture
async def deployment(request: pytest.FixtureRequest, tmp_path: Path, gate_tool: Any) -> AsyncIterator[Any]:
    """Deploys the shipped library, tuned, in front of gate_tool: one sidecar on SQLite or two replicas sharing a
    real redis-server (task_concurrency_support.deploy); ``extra_routes`` after the deployment's own."""
    from task_concurrency_support import Deployment, deploy, tuned_policy

    started: list[Deployment] = []

    async def factory(backend: str, anomalies: dict[str, Any] | None = None,
                      extra_routes: list[dict[str, Any]] | None = None, **config: Any) -> Deployment:
        redis_url = request.getfixturevalue("redis_server").url if backend == "redis" else None
        rego_dir = tuned_policy(tmp_path, anomalies, **config)
        running = await deploy(backend, tmp_path, gate_tool.base, rego_dir, redis_url, extra_routes)
        started.append(running)
        return running

    yield factory
    gate_tool.gate.set()
    for running in started:
        await running.stop()


@pytest.fixture
def redis_server() -> Any:
    """A real redis-server on 127.0.0.1, stopped after the test."""
    from redis_server import RedisServer

    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def idp(tmp_path: Path) -> Any:
    """An identity provider for approvers (tests/approvals_support.py); a test module may define its own."""
    from approvals_support import ApproverIdP

    return ApproverIdP(tmp_path)
