"""Admin listener (default 127.0.0.1:15000)."""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web

from ..approvals import ApprovalStore
from ..audit import AuditError
from ..approvals.desk import ApprovalDesk
from ..credentials import KeyRing
from .credentials_api import CredentialsApi
from ..pipeline import IdentitySource
from ..problems import Refusal
from ..strictjson import NotJson, strict_json
from ..tasks import TaskStore

MAX_TASK_TTL = 24 * 3600

log = logging.getLogger("sidecar.admin")


def problem(refusal: Refusal) -> web.Response:
    return web.Response(status=refusal.status, body=refusal.problem_json(), content_type="application/problem+json",
                        headers=refusal.headers)


@web.middleware
async def problems_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Errors become problem+json in one place."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except Refusal as refusal:
        return problem(refusal)
    except web.HTTPNotFound:
        return web.Response(status=404, content_type="application/problem+json", body=json.dumps(
            {"type": "about:blank", "title": "Not Found", "status": 404, "code": "not_found", "reasons": []}).encode())
    except web.HTTPMethodNotAllowed:
        return problem(Refusal("method_not_allowed", f"{request.method} is not allowed on {request.path}"))


async def read_json(request: web.Request, limit: int = 64 * 1024) -> dict[str, Any]:
    body = await request.content.read(limit + 1)
    if len(body) > limit:
        raise Refusal("body_too_large", f"body exceeds {limit} bytes")
    try:
        value = strict_json(body) if body else {}  # an intent or label JSON cannot carry would break every call
    except NotJson:
        raise Refusal("bad_request", "malformed JSON body") from None
    if not isinstance(value, dict):
        raise Refusal("bad_request", "body must be a JSON object")
    return value


def build_admin_app(*, keys: KeyRing | None, tasks: TaskStore, approvals: ApprovalStore,
                    identity: IdentitySource, approval_desk: ApprovalDesk | None = None,
                    credentials_api: CredentialsApi | None = None) -> web.Application:
    from .approvals_api import register_approval_routes

    app = web.Application(middlewares=[problems_middleware], client_max_size=64 * 1024)

    async def jwks(request: web.Request) -> web.Response:
        # KeyRing.watch re-reads the key directory in the background: no file IO here.
        return web.json_response(keys.jwks() if keys else {"keys": []}, headers={"Cache-Control": "max-age=60"})

    async def create_task(request: web.Request) -> web.Response:
        body = await read_json(request)
        intent = body.get("intent")
        if not isinstance(intent, str) or not intent.strip():
            raise Refusal("bad_request", "intent: a non-empty string is required")
        ttl = body.get("ttl_seconds", 900)
        if not isinstance(ttl, int) or isinstance(ttl, bool) or not 1 <= ttl <= MAX_TASK_TTL:
            raise Refusal("bad_request", f"ttl_seconds: an integer from 1 to {MAX_TASK_TTL}")
        labels = body.get("labels", {})
        if not isinstance(labels, dict):
            raise Refusal("bad_request", "labels: must be an object")
        allowed = body.get("allowed_tools", [])
        if not isinstance(allowed, list) or not all(isinstance(t, str) for t in allowed):
            raise Refusal("bad_request", "allowed_tools: must be a list of route names")
        task = await tasks.create(agent=identity.current().id, intent=intent.strip()[:1000], labels=labels,
                                  ttl_seconds=ttl, allowed_tools=allowed)
        audit = credentials_api.audit if credentials_api is not None else None
        if audit is not None:  # the chain opens with the declared intent and who declared it
            try:
                audit.append({"type": "task.opened", "task_id": task.id, "agent": task.agent, "intent": task.intent,
                              "ttl_seconds": ttl, "expires_at": task.expires_at, "labels": labels,
                              "allowed_tools": allowed}, receipt=False)
            except AuditError:
                log.error("audit log cannot be written: task.opened for %s not recorded", task.id)
        return web.json_response(task.public(), status=201, headers={"Location": f"/v1/tasks/{task.id}"})

    async def show_task(request: web.Request) -> web.Response:
        found = await tasks.get(request.match_info["task_id"])
        if found is None:
            raise Refusal("unknown_task", "no such task")
        task, summary = found
        return web.json_response({**task.public(), "history": summary.as_input()})

    app.router.add_get("/.well-known/jwks.json", jwks)
    if credentials_api is not None:
        credentials_api.register(app)
    app.router.add_post("/v1/tasks", create_task)
    app.router.add_get("/v1/tasks/{task_id}", show_task)
    desk = approval_desk or ApprovalDesk(approvals, verifier=None, audit=None, metrics=None)
    register_approval_routes(app, desk, tasks)
    return app
