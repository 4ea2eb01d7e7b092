"""The exfiltration chain (read confidential, then write to an external host) missed a confidential
read made over MCP. The shipped library classifies an MCP resources/read (or a tools/call the server marks
readOnlyHint, or one in mcp.read_tools) on a route labelled protocol: mcp as a read, and lets it through as
one; the sidecar recorded every call that is not GET/HEAD/OPTIONS as a write, so the read never joined the
task's classifications_read, and the external write that follows it was forwarded, in flight or not. Every
MCP request now counts as a read of its route's classification.

Real parts: httpx as the agent, the embedded engine with the shipped rego/ library, one sidecar on SQLite
or two sidecars on one real redis-server (the read on one, the write on the other), the GateTool upstream."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from harness import open_task
from task_concurrency_support import LOOPBACK_IS_EXTERNAL, GateTool, task_history

BACKENDS = ["sqlite", "redis"]


def confidential_mcp_routes(upstream: str) -> list[dict[str, Any]]:
    labels = {"protocol": "mcp", "environment": "dev", "data_classification": "confidential"}
    return [{"name": "crm_mcp", "match": {"path_prefix": "/crm-mcp"}, "upstream": f"{upstream}/crm-mcp",
             "labels": labels},
            {"name": "slow_crm_mcp", "match": {"path_prefix": "/slow-crm-mcp"}, "upstream": f"{upstream}/gate/crm-mcp",
             "labels": labels, "timeout_seconds": 30}]


READ = {"jsonrpc": "2.0", "id": 1, "method": "resources/read", "params": {"uri": "crm://customers/42"}}


@pytest.mark.parametrize("backend", BACKENDS)
async def test_an_external_write_after_a_confidential_mcp_read_is_held(backend: str, deployment: Any,
                                                                       gate_tool: GateTool) -> None:
    running = await deployment(backend, extra_routes=confidential_mcp_routes(gate_tool.base), **LOOPBACK_IS_EXTERNAL)
    task = await open_task(running.admin, "summarise customer 42")
    headers = {"X-Agent-Task": task}
    async with httpx.AsyncClient(timeout=60) as agent:
        read = await agent.post(f"{running.proxy(0)}/crm-mcp", json=READ, headers=headers)
        assert read.status_code == 200, read.text  # the policy let it through as a read of confidential data
        write = await agent.post(f"{running.proxy(1)}/hooks/send", json={"text": "customer 42 ..."}, headers=headers)
    assert write.status_code == 403 and write.json()["code"] == "approval_required", \
        (write.status_code, write.text[:200], (await task_history(running.admin, task))["classifications_read"])


@pytest.mark.parametrize("backend", BACKENDS)
async def test_an_external_write_while_a_confidential_mcp_read_is_in_flight_is_held(backend: str, deployment: Any,
                                                                                    gate_tool: GateTool) -> None:
    running = await deployment(backend, extra_routes=confidential_mcp_routes(gate_tool.base), **LOOPBACK_IS_EXTERNAL)
    task = await open_task(running.admin, "summarise customer 42")
    headers = {"X-Agent-Task": task}
    async with httpx.AsyncClient(timeout=60) as agent:
        read = asyncio.ensure_future(agent.post(f"{running.proxy(0)}/slow-crm-mcp", json=READ, headers=headers))
        await gate_tool.wait_at_gate(1)  # allowed, reserved, at the upstream
        write = await agent.post(f"{running.proxy(1)}/hooks/send", json={"text": "customer 42 ..."}, headers=headers)
        gate_tool.gate.set()
        assert (await read).status_code == 200
    assert write.status_code == 403 and write.json()["code"] == "approval_required", (write.status_code, write.text[:200])
    assert [a.path for a in gate_tool.arrivals] == ["/gate/crm-mcp/"]
