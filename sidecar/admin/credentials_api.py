"""Admin routes for credentials and task ends: POST /introspect (RFC 7662), POST /v1/tasks/{id}/complete.

A task ends only once its audit event is written: an audit log that cannot be written refuses the
completion (``audit_unavailable``) and the task stays open.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from aiohttp import web

from ..audit import AuditSink
from ..audit.evidence import write_after, write_first
from ..credentials.introspection import IntrospectionCallers, Introspector
from ..problems import Refusal
from ..strictjson import NotJson, strict_json
from ..tasks import Task, TaskStore


MAX_INTROSPECTION_BODY = 32 * 1024

# Called after a task ended and its end was recorded (cause: completed | expired): metrics live in the app.
TaskEnded = Callable[[Task, str], Awaitable[None]]


@dataclass
class CredentialsApi:
    introspector: Introspector
    callers: IntrospectionCallers
    tasks: TaskStore
    agent_id: Callable[[], str]
    on_task_ended: TaskEnded | None = None
    audit: AuditSink | None = None

    def register(self, app: web.Application) -> None:
        app.router.add_post("/introspect", self.introspect)
        app.router.add_post("/v1/tasks/{task_id}/complete", self.complete)

    async def introspect(self, request: web.Request) -> web.Response:
        if not self.callers.allows(request.headers.get("Authorization")):
            raise Refusal("unauthorized", "introspection needs a configured bearer token",
                          headers={"WWW-Authenticate": 'Bearer realm="introspect"'})
        token = await _token_parameter(request)
        answer = await self.introspector.introspect(token)
        return web.json_response(answer, headers={"Cache-Control": "no-store"})

    async def complete(self, request: web.Request) -> web.Response:
        task_id = request.match_info["task_id"]
        found = await self.tasks.get(task_id)
        if found is None or found[0].agent != self.agent_id():
            raise Refusal("unknown_task", "no such task for this agent")
        current = found[0]
        ending = current.status == "open"
        cause = "expired" if ending and current.expires_at <= time.time() else "completed"
        event = {"type": "task.completed" if cause == "completed" else "task.revoked", "task_id": current.id,
                 "cause": cause, "agent": current.agent}
        if ending:
            await write_first(self.audit, event, Refusal(
                "audit_unavailable", "the audit log cannot be written; the task was not ended"))
        try:
            task = await self.tasks.finish(task_id, "completed")
        except Refusal as refusal:
            if ending:
                write_after(self.audit, {**event, "type": "task.end_not_applied", "code": refusal.code})
            raise
        assert task is not None
        if ending and self.on_task_ended is not None:
            await self.on_task_ended(task, cause)
        return web.json_response({**task.public(), "credentials_revoked": True})


async def _token_parameter(request: web.Request) -> str:
    """RFC 7662 section 2.1: form-encoded ``token`` (and an optional ``token_type_hint``); JSON is also accepted."""
    body = await request.content.read(MAX_INTROSPECTION_BODY + 1)
    if len(body) > MAX_INTROSPECTION_BODY:
        raise Refusal("body_too_large", f"body exceeds {MAX_INTROSPECTION_BODY} bytes")
    token: Any = None
    if request.content_type == "application/json":
        try:
            document = strict_json(body)
        except NotJson:
            raise Refusal("bad_request", "malformed JSON body") from None
        token = document.get("token") if isinstance(document, dict) else None
    else:
        values = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).get("token", [])
        token = values[0] if len(values) == 1 else None
    if not isinstance(token, str) or not token:
        raise Refusal("bad_request", "the token parameter is required (once)")
    return token
