"""Issue 15, item 1 (tool side): the verifier serves each credential's jti once.

Real parts: a sidecar minting real credentials, tools on aiohttp behind it, and a real redis-server
shared by two tool replicas.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from harness import SidecarFactory
from harness import RunningSidecar, free_port
from sidecar.verifier import CredentialRejected, MemoryReplayCache, RedisReplayCache, ReplayCache, ToolVerifier
from test_verifier import AiohttpTool, routes_to


def verifier(sc: RunningSidecar, cache: ReplayCache, origin: str | None = None) -> ToolVerifier:
    return ToolVerifier(jwks_url=f"{sc.admin}/.well-known/jwks.json", issuer="agent-sidecar", audience="crm",
                        replay_cache=cache, public_origin=origin)


@pytest.fixture
async def tools() -> AsyncIterator[list[AiohttpTool]]:
    started: list[AiohttpTool] = []
    yield started
    for tool in started:
        await tool.stop()


async def start_replica(tools: list[AiohttpTool], sc: RunningSidecar, cache: ReplayCache, port: int,
                        origin: str) -> AiohttpTool:
    """One replica of a tool whose replicas sit behind one origin (a Service or a load balancer)."""
    tool = AiohttpTool(port)
    tools.append(tool)
    await tool.start(verifier(sc, cache, origin))
    return tool


async def replay(tool: AiohttpTool, token: str, path: str) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.get(f"http://127.0.0.1:{tool.port}{path}", headers={"Authorization": f"Bearer {token}"})


async def test_the_same_token_twice_is_served_once(make_sidecar: SidecarFactory, tools: list[AiohttpTool]) -> None:
    tool = AiohttpTool(free_port())
    sc = await make_sidecar(routes=routes_to(tool.port))
    tools.append(tool)
    await tool.start(verifier(sc, MemoryReplayCache()))
    async with httpx.AsyncClient() as agent:
        first = await agent.get(sc.proxy + "/crm/customers/42")
    again = await replay(tool, tool.served[-1]["token"], "/crm/customers/42")
    assert first.status_code == 200, first.text
    assert again.status_code == 401 and again.json()["code"] == "replayed"
    assert len(tool.served) == 1


async def test_replicas_sharing_redis_serve_a_token_once_between_them(
        make_sidecar: SidecarFactory, tools: list[AiohttpTool], redis_server: Any) -> None:
    port = free_port()
    sc = await make_sidecar(routes=routes_to(port))
    caches = [RedisReplayCache(redis_server.url), RedisReplayCache(redis_server.url)]
    try:
        origin = f"http://127.0.0.1:{port}"
        first_replica = await start_replica(tools, sc, caches[0], port, origin)
        second_replica = await start_replica(tools, sc, caches[1], free_port(), origin)
        async with httpx.AsyncClient() as agent:
            served = await agent.get(sc.proxy + "/crm/customers/42")
        token = first_replica.served[-1]["token"]
        on_the_other_replica = await replay(second_replica, token, "/crm/customers/42")
        assert served.status_code == 200, served.text
        assert on_the_other_replica.status_code == 401 and on_the_other_replica.json()["code"] == "replayed"
        assert second_replica.served == []

        redis_server.stop()  # the shared cache is gone: refuse, never serve a jti that may have been used
        async with httpx.AsyncClient() as agent:
            refused = await agent.get(sc.proxy + "/crm/customers/43")
        assert refused.status_code == 503 and refused.json()["code"] == "replay_check_unavailable"
        redis_server.start()
        async with httpx.AsyncClient() as agent:
            back = await agent.get(sc.proxy + "/crm/customers/44")
        assert back.status_code == 200, back.text
    finally:
        for cache in caches:
            await cache.close()


async def test_the_redis_key_expires_with_the_credential(redis_server: Any) -> None:
    import redis.asyncio as aioredis

    cache = RedisReplayCache(redis_server.url, prefix="t:")
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        forget_at = time.time() + 65
        assert await cache.first_use("j-1", forget_at) is True
        assert await cache.first_use("j-1", forget_at) is False
        expires_at = await client.expiretime("t:j-1")
        assert int(forget_at) <= expires_at <= int(forget_at) + 1
    finally:
        await client.aclose()
        await cache.close()


async def test_a_full_memory_cache_refuses_rather_than_forgets_and_evicts_only_expired_entries() -> None:
    cache = MemoryReplayCache(max_entries=2)
    now = time.time()
    assert await cache.first_use("expired", now - 1) is True
    assert await cache.first_use("live-1", now + 60) is True
    assert await cache.first_use("live-2", now + 60) is True  # "expired" made room
    with pytest.raises(CredentialRejected) as refused:
        await cache.first_use("live-3", now + 60)
    assert refused.value.reason == "replay_cache_full" and refused.value.status == 503
    assert await cache.first_use("live-1", now + 60) is False  # still remembered
    assert len(cache) == 2
