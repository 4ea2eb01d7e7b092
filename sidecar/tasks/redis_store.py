"""Tasks and the revocation list in Redis, so that replicas share them.

Keys (under ``prefix``): ``task:{id}`` the task document, ``task:{id}:summary``
its history summary, ``task:{id}:jtis`` the jtis minted for it,
``jti:{jti}`` one credential's state. Every key expires on its own: tasks a
retention period after their expiry, credentials an hour after theirs.
Read-modify-write (summary, status) uses WATCH/MULTI, retried on conflict.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, WatchError

from ..problems import Refusal
from .codec import summary_from_json, summary_to_json, task_from_json, task_to_json
from .sqlite import CREDENTIAL_GRACE_SECONDS, TASK_RETENTION_SECONDS
from .store import CallRecord, CredentialState, Task, TaskSummary, check_end_status, new_task

T = TypeVar("T")
WATCH_RETRIES = 20


class RedisTaskStore:
    def __init__(self, url: str, *, prefix: str = "agent-sidecar:") -> None:
        self.prefix = prefix
        # One retry on a broken connection only: after a Redis restart the pool still holds sockets from
        # before it, and the first command on each would fail although Redis answers again (issue 15).
        # Timeouts are not retried: the command may have been applied.
        self._redis: redis.Redis = redis.Redis.from_url(
            url, socket_timeout=2.0, socket_connect_timeout=2.0,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)))

    def _task_key(self, task_id: str) -> str:
        return f"{self.prefix}task:{task_id}"

    def _jti_key(self, jti: str) -> str:
        return f"{self.prefix}jti:{jti}"

    async def _guarded(self, work: Callable[[], Awaitable[T]]) -> T:
        try:
            return await work()
        except RedisError as exc:
            raise Refusal("store_unavailable", f"task store (redis): {type(exc).__name__}") from None

    async def create(self, *, agent: str, intent: str, labels: dict[str, Any], ttl_seconds: int,
                     allowed_tools: list[str]) -> Task:
        task = new_task(agent=agent, intent=intent, labels=labels, ttl_seconds=ttl_seconds, allowed_tools=allowed_tools)
        keep_until = int(task.expires_at + TASK_RETENTION_SECONDS)
        key = self._task_key(task.id)

        async def write() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(key, task_to_json(task), exat=keep_until)
                pipe.set(f"{key}:summary", summary_to_json(TaskSummary()), exat=keep_until)
                await pipe.execute()

        await self._guarded(write)
        return task

    async def get(self, task_id: str) -> tuple[Task, TaskSummary] | None:
        key = self._task_key(task_id)

        async def read() -> tuple[Any, Any]:
            doc, summary = await self._redis.mget([key, f"{key}:summary"])
            return doc, summary

        doc, summary = await self._guarded(read)
        if doc is None:
            return None
        return task_from_json(doc), summary_from_json(summary) if summary else TaskSummary()

    async def _update(self, key: str, change: Callable[[bytes], str | None]) -> bool:
        """WATCH key, compute its new value from the old one, write it back unless someone else did first."""
        for _ in range(WATCH_RETRIES):
            async with self._redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(key)
                    current = await pipe.get(key)
                    if current is None:
                        return False
                    new = change(current if isinstance(current, bytes) else str(current).encode())
                    if new is None:
                        return True
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.set(key, new, keepttl=True)
                    await pipe.execute()
                    return True
                except WatchError:
                    continue
        raise Refusal("store_unavailable", "task store (redis): too much contention on one task")

    async def record(self, task_id: str, record: CallRecord) -> None:
        def add(current: bytes) -> str:
            summary = summary_from_json(current)
            summary.add(record)
            return summary_to_json(summary)

        await self._guarded(lambda: self._update(f"{self._task_key(task_id)}:summary", add))

    async def finish(self, task_id: str, status: str) -> Task | None:
        check_end_status(status)
        key = self._task_key(task_id)
        ended: list[Task] = []

        def end(current: bytes) -> str | None:
            task = task_from_json(current)
            ended[:] = [task]
            if task.status != "open":
                return None
            task.status = status
            return task_to_json(task)

        if not await self._guarded(lambda: self._update(key, end)):
            return None
        await self._guarded(lambda: self._revoke_credentials(task_id, status))
        return ended[0]

    async def _revoke_credentials(self, task_id: str, cause: str) -> None:
        jtis = await self._redis.smembers(f"{self._task_key(task_id)}:jtis")
        for raw in jtis:
            jti = raw.decode() if isinstance(raw, bytes) else str(raw)

            def revoke(current: bytes) -> str:
                state = json.loads(current)
                if not state.get("revoked"):
                    state.update(revoked=True, cause=cause)
                return json.dumps(state)

            await self._update(self._jti_key(jti), revoke)

    async def record_credential(self, jti: str, task_id: str | None, expires_at: int) -> None:
        state = json.dumps({"task_id": task_id, "expires_at": expires_at, "revoked": False})

        async def write() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(self._jti_key(jti), state, exat=expires_at + CREDENTIAL_GRACE_SECONDS)
                if task_id is not None:
                    jtis = f"{self._task_key(task_id)}:jtis"
                    pipe.sadd(jtis, jti)
                    pipe.expireat(jtis, int(time.time()) + TASK_RETENTION_SECONDS)
                await pipe.execute()

        await self._guarded(write)

    async def credential(self, jti: str) -> CredentialState | None:
        raw = await self._guarded(lambda: self._redis.get(self._jti_key(jti)))
        if raw is None:
            return None
        state = json.loads(raw)
        return CredentialState(jti, state.get("task_id"), int(state["expires_at"]), bool(state.get("revoked")),
                               state.get("cause"))

    async def close(self) -> None:
        await self._redis.aclose()
