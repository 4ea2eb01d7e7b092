"""/v1/approvals for approvers, and the approver page under /ui/.

The status URL ``GET /v1/approvals/{id}`` stays open: the agent was given the id (an
unguessable capability) to poll it. Listing, approving and denying need a verified
approver token; the page is static and talks to the same API with that token.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from aiohttp import web

from ..approvals.desk import ApprovalDesk
from ..approvals.store import MAX_COMMENT, Approval
from ..problems import Refusal
from ..tasks import TaskStore

UI_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
UI_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


async def _comment(request: web.Request) -> str:
    from .server import read_json  # the admin listener's one JSON body reader

    body = await read_json(request)
    comment = body.get("comment", "")
    if not isinstance(comment, str) or len(comment) > MAX_COMMENT:
        raise Refusal("bad_request", f"comment: a string of at most {MAX_COMMENT} characters")
    return comment.strip()


async def _with_task(approval: Approval, tasks: TaskStore) -> dict[str, Any]:
    """The approval plus what the approver needs to judge it: the task's intent and recent calls."""
    doc = approval.public()
    doc["task"] = None
    if approval.binding.task_id:
        found = await tasks.get(approval.binding.task_id)
        if found is not None:
            task, summary = found
            doc["task"] = {"id": task.id, "intent": task.intent, "status": task.status,
                           "recent": summary.as_input()["recent"]}
    return doc


def register_approval_routes(app: web.Application, desk: ApprovalDesk, tasks: TaskStore) -> None:
    async def list_pending(request: web.Request) -> web.Response:
        approver = await desk.identify(request.headers.get("Authorization"))
        items = await desk.store.list_pending()
        await desk.refresh_pending_gauge()
        return web.json_response({"approver": {"subject": approver.subject, "groups": list(approver.groups)},
                                  "approvals": [await _with_task(a, tasks) for a in items]})

    async def show(request: web.Request) -> web.Response:
        approval = await desk.store.get(request.match_info["approval_id"])
        if approval is None:
            raise Refusal("not_found", "no such approval")
        return web.json_response(approval.public())

    async def decide(request: web.Request, approve: bool) -> web.Response:
        approver = None
        try:
            approver = await desk.identify(request.headers.get("Authorization"))
            comment = await _comment(request)
            approval = await desk.decide(request.match_info["approval_id"], approver, approve=approve, comment=comment)
        except Refusal as refusal:  # a refused approver action is audited and counted (issue 20)
            desk.refused(request.match_info["approval_id"], "approve" if approve else "deny", refusal,
                         request.headers.get("Authorization"), approver)
            raise
        return web.json_response(approval.public())

    async def approve(request: web.Request) -> web.Response:
        return await decide(request, True)

    async def deny(request: web.Request) -> web.Response:
        return await decide(request, False)

    async def whoami(request: web.Request) -> web.Response:
        approver = await desk.identify(request.headers.get("Authorization"))
        return web.json_response({"subject": approver.subject, "groups": list(approver.groups), "name": approver.name})

    app.router.add_get("/v1/approvals", list_pending)
    app.router.add_get("/v1/approvals/{approval_id}", show)
    app.router.add_post("/v1/approvals/{approval_id}/approve", approve)
    app.router.add_post("/v1/approvals/{approval_id}/deny", deny)
    app.router.add_get("/v1/approver", whoami)
    _register_ui(app)


def _register_ui(app: web.Application) -> None:
    folder = resources.files("sidecar.admin").joinpath("ui")
    files = {name: folder.joinpath(name).read_bytes() for name in UI_FILES}  # read once at start-up

    async def page(request: web.Request) -> web.Response:
        name = request.match_info.get("name") or "index.html"
        if name not in files:
            raise Refusal("not_found", "no such file")
        return web.Response(body=files[name], content_type=UI_FILES[name], headers=UI_HEADERS)

    async def to_page(request: web.Request) -> web.Response:
        raise web.HTTPFound("/ui/")

    app.router.add_get("/ui", to_page)
    app.router.add_get("/ui/", page)
    app.router.add_get("/ui/{name}", page)
