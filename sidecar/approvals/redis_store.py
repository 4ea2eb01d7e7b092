"""The shared store: one approval queue for many sidecars, in Redis.

Records are JSON strings under ``<prefix>approval:<id>`` (kept until a retention period
after their expiry), the pending queue is a sorted set scored by expiry (soonest first; expired ones fall off), and every
change is published on ``<prefix>approvals:events`` so the sidecar holding the call
wakes at once, whichever sidecar the approver used. Updates are optimistic WATCH/MULTI
transactions around :func:`apply_verdict`. The pending approvals of each task and of each
agent are sorted sets too, counted and added to by one Lua script with the record itself
(approvals.max_pending_per_*), after it looked for the call's own pending approval: a script
runs alone in Redis, so replicas filing at once cannot both take the last place, nor file
one call twice. Any Redis failure is a ``store_unavailable``
refusal: nothing that needs the store is forwarded while Redis is down, and the client
reconnects by itself when it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, WatchError

from ..problems import Refusal
from .store import (PENDING_LIST_LIMIT, Approval, PendingLimits, RequestBinding, Verdict, Waiters, apply_verdict, mark_used,
                    too_many_pending, wait_for_decision)

log = logging.getLogger("sidecar.approvals.redis")

T = TypeVar("T")
MAX_TRANSACTION_ATTEMPTS = 20
RECONNECT_DELAY_SECONDS = 0.5

# KEYS: the record, its binding, the pending queue, the task's pending set, the agent's pending set.
# ARGV: the record's JSON, its id, the records' expiry (ms), its own expiry (the score), now, the task's and the
# agent's limit (0: none), the records' key prefix, what the approval asks (see _asks), then its rules, each once.
# Returns {"twin", <its JSON>} when the binding's newest approval still waits for a human and asks the same (the call's
# approval: nothing is written), {"task"} or {"agent"} when that one is full (nothing is written), else {"filed"}.
# The twin's record is read by a key built here (its id is only known from the binding): one Redis, not a cluster.
CREATE_WITHIN_LIMITS = """
local now = tonumber(ARGV[5])
local function asks(doc)
    local group = "-"
    if type(doc.group) == "string" then group = "g" .. doc.group end
    local parts = {tostring(doc.approvers_required), group, tostring(doc.risk)}
    for i = 1, 3 do parts[i] = #parts[i] .. ":" .. parts[i] end
    return table.concat(parts)
end
local function same_rules(doc)
    local rules, count = {}, 0
    if type(doc.rules) == "table" then
        for _, rule in ipairs(doc.rules) do
            if not rules[rule] then rules[rule] = true; count = count + 1 end
        end
    end
    if count ~= #ARGV - 9 then return false end
    for i = 10, #ARGV do
        if not rules[ARGV[i]] then return false end
    end
    return true
end
local newest = redis.call("GET", KEYS[2])
if newest then
    local raw = redis.call("GET", ARGV[8] .. newest)
    if raw then
        local doc = cjson.decode(raw)
        if doc.status == "pending" and (tonumber(doc.expires_at) or 0) > now and asks(doc) == ARGV[9] and same_rules(doc) then
            return {"twin", raw}
        end
    end
end
redis.call("ZREMRANGEBYSCORE", KEYS[3], "-inf", now)
local limits = {tonumber(ARGV[6]), tonumber(ARGV[7])}
local scopes = {"task", "agent"}
for i = 1, 2 do
    local key = KEYS[3 + i]
    redis.call("ZREMRANGEBYSCORE", key, "-inf", now)
    if limits[i] > 0 and redis.call("ZCARD", key) >= limits[i] then
        return {scopes[i]}
    end
end
redis.call("SET", KEYS[1], ARGV[1], "PXAT", ARGV[3])
redis.call("SET", KEYS[2], ARGV[2], "PXAT", ARGV[3])
redis.call("ZADD", KEYS[3], ARGV[4], ARGV[2])
for i = 4, 5 do
    redis.call("ZADD", KEYS[i], ARGV[4], ARGV[2])
    local latest = redis.call("ZRANGE", KEYS[i], -1, -1, "WITHSCORES")
    redis.call("PEXPIREAT", KEYS[i], string.format("%.0f", math.ceil(tonumber(latest[2]) * 1000) + 1000))
end
return {"filed"}
"""


def _asks(approval: Approval) -> str:
    """What the approval asks of the humans, as the script computes it from a record (store.asks_the_same)."""
    parts = [str(approval.approvers_required), "-" if approval.group is None else "g" + approval.group, approval.risk]
    return "".join(f"{len(part.encode())}:{part}" for part in parts)



class RedisApprovalStore:
    def __init__(self, url: str, *, prefix: str = "agent-sidecar:", retention_seconds: int = 7 * 86400,
                 timeout_seconds: float = 2.0) -> None:
        self.url = url
        self.prefix = prefix
        self.retention_seconds = retention_seconds
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout_seconds, socket_connect_timeout=timeout_seconds,
            # One retry on a broken connection only: after a Redis restart the pool still holds sockets
            # from before it, and the first command on each would fail although Redis answers again.
            # Timeouts are not retried: the command may have been applied.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)), decode_responses=False)
        self._create_within_limits = self._redis.register_script(CREATE_WITHIN_LIMITS)
        self._waiters = Waiters()
        self._listener: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def _pending_key(self) -> str:
        return f"{self.prefix}approvals:pending"

    @property
    def _channel(self) -> str:
        return f"{self.prefix}approvals:events"

    def _key(self, approval_id: str) -> str:
        return f"{self.prefix}approval:{approval_id}"

    @contextlib.asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        try:
            yield
        except (RedisError, OSError) as exc:
            raise Refusal("store_unavailable", f"approval store (redis) is unreachable: {type(exc).__name__}") from None

    def _expire_at_ms(self, approval: Approval) -> int:
        return int((approval.expires_at + self.retention_seconds) * 1000)

    def _pending_scope_keys(self, binding: RequestBinding) -> tuple[str, str]:
        """The sorted sets of the approvals pending in the binding's task, and of its agent."""
        task = hashlib.sha256(f"{binding.agent}\n{binding.task_id or ''}".encode()).hexdigest()
        agent = hashlib.sha256(binding.agent.encode()).hexdigest()
        return f"{self.prefix}approvals:pending:task:{task}", f"{self.prefix}approvals:pending:agent:{agent}"

    async def create(self, approval: Approval, limits: PendingLimits | None = None) -> Approval:
        keys = [self._key(approval.id), self._binding_key(approval.binding), self._pending_key,
                *self._pending_scope_keys(approval.binding)]
        args: list[str | int | float] = [approval.to_json(), approval.id, self._expire_at_ms(approval),
                                         approval.expires_at, time.time(),
                                         limits.per_task if limits else 0, limits.per_agent if limits else 0,
                                         self._key(""), _asks(approval), *sorted(set(approval.rules))]
        async with self._guard():
            answer = await self._create_within_limits(keys=keys, args=args)
        outcome = _text(answer[0])
        if outcome == "twin":
            twin = Approval.from_json(answer[1])
            twin.status = twin.effective_status(time.time())
            return twin
        if outcome != "filed":
            assert limits is not None
            raise too_many_pending(outcome, limits.per_task if outcome == "task" else limits.per_agent)
        return approval

    def _binding_key(self, binding: RequestBinding) -> str:
        return f"{self.prefix}approval-binding:{binding.key}"

    async def for_binding(self, binding: RequestBinding) -> Approval | None:
        async with self._guard():
            approval_id = await self._redis.get(self._binding_key(binding))
        return await self.get(_text(approval_id)) if approval_id is not None else None

    async def get(self, approval_id: str) -> Approval | None:
        async with self._guard():
            raw = await self._redis.get(self._key(approval_id))
        if raw is None:
            return None
        approval = Approval.from_json(raw)
        approval.status = approval.effective_status(time.time())
        return approval

    async def _update(self, approval_id: str, change: Callable[[Approval], T]) -> tuple[Approval | None, T | None]:
        key = self._key(approval_id)
        async with self._guard():
            async with self._redis.pipeline(transaction=True) as pipe:
                for _ in range(MAX_TRANSACTION_ATTEMPTS):
                    try:
                        await pipe.watch(key)
                        raw = await pipe.get(key)
                        if raw is None:
                            return None, None
                        approval = Approval.from_json(raw)
                        result = change(approval)
                        pipe.multi()  # type: ignore[no-untyped-call]
                        pipe.set(key, approval.to_json(), keepttl=True)
                        if approval.status != "pending":
                            for pending in (self._pending_key, *self._pending_scope_keys(approval.binding)):
                                pipe.zrem(pending, approval_id)
                        await pipe.execute()
                    except WatchError:
                        continue
                    await self._redis.publish(self._channel, approval_id)
                    return approval, result
        raise Refusal("store_unavailable", "approval store (redis) kept changing under this update; try again")

    async def consume(self, approval_id: str) -> bool:
        _, used = await self._update(approval_id, lambda a: mark_used(a, time.time()))
        return bool(used)

    async def decide(self, approval_id: str, verdict: Verdict) -> Approval:
        approval, _ = await self._update(approval_id, lambda a: apply_verdict(a, verdict, time.time()))
        if approval is None:
            raise Refusal("approval_invalid", "no such approval")
        return approval

    async def list_pending(self, limit: int = PENDING_LIST_LIMIT) -> list[Approval]:
        async with self._guard():
            await self._redis.zremrangebyscore(self._pending_key, "-inf", time.time())
            ids = await self._redis.zrange(self._pending_key, 0, limit - 1)
            raws = await self._redis.mget([self._key(_text(i)) for i in ids]) if ids else []
        now = time.time()
        found = [Approval.from_json(raw) for raw in raws if raw is not None]
        return [a for a in found if a.effective_status(now) == "pending"]

    async def count_pending(self) -> int:
        async with self._guard():
            count: int = await self._redis.zcount(self._pending_key, time.time(), "+inf")
        return count

    async def wait(self, approval_id: str, timeout_seconds: float) -> Approval | None:
        self._ensure_listener()
        return await wait_for_decision(self.get, self._waiters, approval_id, timeout_seconds)

    def _ensure_listener(self) -> None:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.get_running_loop().create_task(self._listen(), name="approvals-redis-listener")

    async def _listen(self) -> None:
        """Wake local waiters on every published change; resubscribe after Redis comes back."""
        while not self._closed:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                self._waiters.wake_all()  # anything missed while unsubscribed is re-read now
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self._waiters.wake(_text(message.get("data")))
            except (RedisError, OSError):
                await asyncio.sleep(RECONNECT_DELAY_SECONDS)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def ping(self) -> tuple[bool, str]:
        try:
            async with self._guard():
                await self._redis.ping()
        except Refusal as refusal:
            return False, refusal.detail
        return True, "redis answers"

    async def close(self) -> None:
        self._closed = True
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        with contextlib.suppress(RedisError, OSError):
            await self._redis.aclose()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
