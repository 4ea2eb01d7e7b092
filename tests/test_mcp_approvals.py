"""MCP approvals bind to the call, not the bytes: the MCP SDK's own client retries a held tools/call
with a new JSON-RPC id and no extra header, and the approval a human granted is used exactly once."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from mcp.client.session import ClientSession
from mcp.client.streamable_http import create_mcp_http_client, streamable_http_client
from mcp.server.mcpserver import MCPServer

from approvals_support import ApproverIdP, approve
from harness import SHIPPED_POLICY, open_task, serving_asgi


@pytest.fixture
async def records_server() -> AsyncIterator[tuple[str, list[int]]]:
    server = MCPServer("records")
    deleted: list[int] = []

    @server.tool()
    def delete_record(record_id: int) -> str:
        deleted.append(record_id)
        return f"deleted {record_id}"

    async with serving_asgi(server.streamable_http_app(stateless_http=True, json_response=True)) as url:
        yield url, deleted


async def records_sidecar(make_sidecar: Any, upstream: str, idp: ApproverIdP, store: dict[str, Any]) -> Any:
    """A sidecar with the shipped policy, approvers, and the records server as an MCP route."""
    return await make_sidecar(policy={"engine": "embedded", "rego_dir": str(SHIPPED_POLICY), "timeout_ms": 2000},
                              approvals=idp.config(), store=store,
                              routes=[{"name": "records", "match": {"path_prefix": "/records"}, "upstream": upstream,
                                       "protocol": "mcp", "labels": {"environment": "dev"}}])


@contextlib.asynccontextmanager
async def mcp_session(proxy: str, task: str) -> AsyncIterator[ClientSession]:
    """The official SDK's client session on the records route, inside ``task``, initialised."""
    client = create_mcp_http_client(headers={"X-Agent-Task": task})
    async with client, streamable_http_client(f"{proxy}/records/mcp", http_client=client) as streams:
        async with ClientSession(streams[0], streams[1]) as session:
            await session.initialize()
            yield session


def approval_id_in(result: Any) -> str:
    assert result.is_error, result
    found = re.match(r"waiting for human approval (ap-[0-9a-f]+);", result.content[0].text)
    assert found, result.content[0].text
    return found.group(1)


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "sqlite":
        return {"backend": "sqlite"}
    server = request.getfixturevalue("redis_server")
    return {"backend": "redis", "redis_url": server.url}


async def test_a_plain_retry_of_the_same_tool_call_uses_its_approval_once(
        make_sidecar: Any, records_server: tuple[str, list[int]], tmp_path: Path, store: dict[str, Any]) -> None:
    upstream, deleted = records_server
    idp = ApproverIdP(tmp_path)
    sc = await records_sidecar(make_sidecar, upstream, idp, store)
    task = await open_task(sc.admin, "remove the duplicate customer record 7")
    approver = idp.token("alice@example.com", ["approvers"])
    async with mcp_session(sc.proxy, task) as session:
        held = approval_id_in(await session.call_tool("delete_record", {"record_id": 7}))
        # Called again before anyone decided: the same approval, not a second one.
        assert approval_id_in(await session.call_tool("delete_record", {"record_id": 7})) == held
        assert (await approve(sc.admin, held, approver)).status_code == 200
        # Another argument is another call: it needs its own approval.
        other = approval_id_in(await session.call_tool("delete_record", {"record_id": 8}))
        assert other != held
        done: Any = await session.call_tool("delete_record", {"record_id": 7})
        assert not done.is_error and done.content[0].text == "deleted 7"
        # Used once: the next identical call is held afresh.
        again = approval_id_in(await session.call_tool("delete_record", {"record_id": 7}))
        assert again not in (held, other)
    assert deleted == [7]


async def test_an_approval_database_from_before_binding_lookups_is_migrated(tmp_path: Path) -> None:
    import sqlite3
    import time

    from sidecar.approvals.sqlite_store import SqliteApprovalStore
    from sidecar.approvals.store import Approval, RequestBinding

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE approvals (id TEXT PRIMARY KEY, status TEXT NOT NULL, created_at REAL NOT NULL, "
                   "expires_at REAL NOT NULL, doc TEXT NOT NULL)")
    store = SqliteApprovalStore(path)
    binding = RequestBinding("POST", "http://tools.internal/mcp", "mcp-call:00", "spiffe://a", "t-1")
    now = time.time()
    approval = Approval(id="ap-1", binding=binding, decision_id="d-1", route="tools", reasons=[], risk="high",
                        approvers_required=1, group=None, created_at=now, expires_at=now + 60)
    await store.create(approval)
    found = await store.for_binding(binding)
    assert found is not None and found.id == "ap-1"
    assert await store.for_binding(RequestBinding("POST", "http://tools.internal/mcp", "mcp-call:01", "spiffe://a", "t-1")) is None
    await store.close()


async def test_a_call_a_human_denied_is_answered_as_denied_and_nobody_is_asked_again(
        make_sidecar: Any, records_server: tuple[str, list[int]], tmp_path: Path) -> None:
    from approvals_support import list_pending

    upstream, deleted = records_server
    idp = ApproverIdP(tmp_path)
    sc = await records_sidecar(make_sidecar, upstream, idp, {"backend": "sqlite"})
    task = await open_task(sc.admin, "remove the duplicate customer record 7")
    approver = idp.token("alice@example.com", ["approvers"])
    async with mcp_session(sc.proxy, task) as session:
        held = approval_id_in(await session.call_tool("delete_record", {"record_id": 7}))
        assert (await approve(sc.admin, held, approver, verdict="deny", comment="not that one")).status_code == 200
        retried: Any = await session.call_tool("delete_record", {"record_id": 7})
    assert retried.is_error and retried.content[0].text.startswith(f"a human denied this call (approval {held})")
    assert await list_pending(sc.admin, approver) == []
    assert deleted == []
