"""Tasks and the revocation list in Redis, so that replicas share them.

Keys (under ``prefix``): ``task:{id}`` the task document, ``task:{id}:summary``
its completed history, ``task:{id}:in_flight`` a hash of its reservations (decision
id -> reservation), ``task:{id}:version`` the history's version, ``task:{id}:jtis``
the jtis minted for it, ``jti:{jti}`` one credential's state. Every key expires on
its own: tasks a retention period after their expiry, credentials an hour after theirs.

A reservation is a compare-and-set executed in Redis (one Lua script: the version
still the one the decision read, then HSET and INCR), so the read-decide-reserve
sequence of one task is atomic across replicas without a lock a crashed replica could
leave behind. The other read-modify-writes (completed history, status) use
WATCH/MULTI, retried on conflict. A read takes every key of the task in one MULTI.
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
from .codec import reservation_from_json, reservation_to_json
from .store import (MAX_IN_FLIGHT_PER_TASK, CallRecord, CredentialState, Reservation, Task, TaskSummary,
                    check_end_status, check_room_in_flight, new_task)

T = TypeVar("T")
WATCH_RETRIES = 20
# The in-flight hash outlives its newest reservation by this much: at least as long as its task's keys are
# kept (the longest a task lives, sidecar.admin.server.MAX_TASK_TTL, plus TASK_RETENTION_SECONDS after its
# end), so that an expired reservation is still there for any later read, which counts it as a completed
# call (TaskSummary.settle_expired). Settled entries are deleted at once; only unsettled ones wait this long.
IN_FLIGHT_KEEP_SECONDS = 24 * 3600 + TASK_RETENTION_SECONDS

# KEYS: version, in_flight. ARGV: expected version, reservation id, reservation JSON, in-flight cap,
# keep-until (epoch seconds). Returns 1 reserved, 0 the version moved (decide again), -1 too many in flight.
RESERVE_SCRIPT = """
if tonumber(redis.call('GET', KEYS[1]) or '0') ~= tonumber(ARGV[1]) then return 0 end
if redis.call('HLEN', KEYS[2]) >= tonumber(ARGV[4]) then return -1 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('EXPIREAT', KEYS[2], ARGV[5])
redis.call('INCR', KEYS[1])
if redis.call('TTL', KEYS[1]) < 0 then redis.call('EXPIREAT', KEYS[1], ARGV[5]) end
return 1
"""


class RedisTaskStore:
    def __init__(self, url: str, *, prefix: str = "agent-sidecar:") -> None:
        self.prefix = prefix
        # One retry on a broken connection only: after a Redis restart the pool still holds sockets from
        # before it, and the first command on each would fail although Redis answers again (issue 15).
        # Timeouts are not retried: the command may have been applied.
        self._redis: redis.Redis = redis.Redis.from_url(
            url, socket_timeout=2.0, socket_connect_timeout=2.0,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)))
        self._reserve_script = self._redis.register_script(RESERVE_SCRIPT)

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
                pipe.set(f"{key}:summary", summary_to_json(TaskSummary(), in_flight=False), exat=keep_until)
                pipe.set(f"{key}:version", 0, exat=keep_until)
                await pipe.execute()

        await self._guarded(write)
        return task

    async def get(self, task_id: str) -> tuple[Task, TaskSummary] | None:
        key = self._task_key(task_id)

        async def read() -> list[Any]:
            async with self._redis.pipeline(transaction=True) as pipe:  # one consistent snapshot of the task
                pipe.mget([key, f"{key}:summary", f"{key}:version"])
                pipe.hgetall(f"{key}:in_flight")
                found: list[Any] = await pipe.execute()
                return found

        (doc, summary_json, version), in_flight = await self._guarded(read)
        if doc is None:
            return None
        summary = summary_from_json(summary_json) if summary_json else TaskSummary()
        summary.version = int(version or 0)
        summary.in_flight = _reservations(in_flight)
        expired = summary.settle_expired(time.time())
        if expired:
            await self._settle_expired(task_id, expired)
        return task_from_json(doc), summary

    async def _settle_expired(self, task_id: str, reservations: list[Reservation]) -> None:
        """Expired reservations (see TaskSummary.settle_expired) join the stored history as completed calls, all
        in one transaction, each only while it is still in the in-flight hash (so once, whoever settles it)."""
        try:
            await self._guarded(lambda: self._settle(task_id, reservations))
        except Refusal:
            pass  # every reader counts them until they are settled; the next one tries again

    async def _update(self, key: str, change: Callable[[bytes], str | None],
                      also: Callable[[Any], None] | None = None) -> bool:
        """WATCH key, compute its new value from the old one, write it back unless someone else did first.

        ``also`` queues further commands into the same MULTI (they happen only with the write)."""
        async def attempt(pipe: Any) -> bool:
            current = await pipe.get(key)
            if current is None:
                return False
            new = change(current if isinstance(current, bytes) else str(current).encode())
            if new is None:
                return True
            pipe.multi()
            pipe.set(key, new, keepttl=True)
            if also is not None:
                also(pipe)
            await pipe.execute()
            return True

        return await self._transaction([key], attempt)

    async def _transaction(self, keys: list[str], attempt: Callable[[Any], Awaitable[T]]) -> T:
        """``attempt(pipe)`` with ``keys`` watched: it reads, then writes in one MULTI; again if another client
        wrote one of the keys first."""
        for _ in range(WATCH_RETRIES):
            async with self._redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(*keys)
                    return await attempt(pipe)
                except WatchError:
                    continue
        raise Refusal("store_unavailable", "task store (redis): too much contention on one task")

    async def record(self, task_id: str, record: CallRecord) -> None:
        key = self._task_key(task_id)

        def add(current: bytes) -> str:
            summary = summary_from_json(current)
            summary.add(record)
            return summary_to_json(summary, in_flight=False)

        await self._guarded(lambda: self._update(f"{key}:summary", add, also=lambda pipe: pipe.incr(f"{key}:version")))

    async def reserve(self, task_id: str, reservation: Reservation, *, version: int, wait: bool = True) -> bool:
        """The compare-and-set is the write: durable in Redis when it answers, ``wait`` or not."""
        key = self._task_key(task_id)
        keep_until = int(reservation.expires_at + IN_FLIGHT_KEEP_SECONDS)
        arguments: list[str | int] = [version, reservation.id, reservation_to_json(reservation), MAX_IN_FLIGHT_PER_TASK,
                                      keep_until]
        outcome = await self._guarded(
            lambda: self._reserve_script(keys=[f"{key}:version", f"{key}:in_flight"], args=arguments))
        if outcome == -1:
            check_room_in_flight(MAX_IN_FLIGHT_PER_TASK)  # raises task_contended
        return bool(outcome == 1)

    async def committed(self, reservation_id: str) -> None:
        return None  # reserve answered only once Redis had applied it

    async def confirm(self, task_id: str, reservation: Reservation) -> None:
        await self._guarded(lambda: self._settle(task_id, [reservation]))

    async def _settle(self, task_id: str, reservations: list[Reservation]) -> None:
        """Count the reservations still in the in-flight hash as completed calls and delete them, in one MULTI
        watching both keys: one gone from the hash was settled already (a retry, another replica, its expiry)."""
        key = self._task_key(task_id)
        summary_key, in_flight = f"{key}:summary", f"{key}:in_flight"

        async def attempt(pipe: Any) -> None:
            present = await pipe.hmget(in_flight, [r.id for r in reservations])
            pending = [r for r, there in zip(reservations, present) if there is not None]
            current = await pipe.get(summary_key)
            if not pending or current is None:
                return
            summary = summary_from_json(current)
            for reservation in pending:
                summary.count_settled(reservation)
            pipe.multi()
            pipe.set(summary_key, summary_to_json(summary, in_flight=False), keepttl=True)
            pipe.hdel(in_flight, *[r.id for r in pending])
            await pipe.execute()

        await self._transaction([summary_key, in_flight], attempt)

    async def release(self, task_id: str, reservation_id: str) -> None:
        await self._guarded(lambda: self._redis.hdel(f"{self._task_key(task_id)}:in_flight", reservation_id))

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

        # The version moves with the status: a decision that read the task open cannot reserve on it any more.
        if not await self._guarded(lambda: self._update(key, end, also=lambda pipe: pipe.incr(f"{key}:version"))):
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


def _reservations(fields: dict[Any, Any]) -> dict[str, Reservation]:
    found: dict[str, Reservation] = {}
    for raw in fields.values():
        try:
            reservation = reservation_from_json(raw)
        except (ValueError, KeyError, TypeError):
            continue  # unreadable: ignored (it expires with the hash)
        found[reservation.id] = reservation
    return found
