"""``agent-sidecar approvals list|show|approve|deny``: a thin client of the admin API.

The approver token comes from ``--token-file`` or the ``AGENT_SIDECAR_APPROVER_TOKEN``
environment variable, never from a command-line argument (argv is visible to every
process on the machine), and it is never printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from ..secret import Secret
from .preview import describe, key_values

TOKEN_ENV = "AGENT_SIDECAR_APPROVER_TOKEN"
ADMIN_ENV = "AGENT_SIDECAR_ADMIN"


class CliError(Exception):
    pass


def _token(args: argparse.Namespace) -> Secret:
    if args.token_file:
        try:
            return Secret(Path(args.token_file).read_text(encoding="utf-8").strip())
        except OSError as exc:
            raise CliError(f"{args.token_file}: cannot read ({exc.strerror})") from None
    value = os.environ.get(TOKEN_ENV, "").strip()
    if not value:
        raise CliError(f"an approver token is needed: --token-file FILE or {TOKEN_ENV}")
    return Secret(value)


def _call(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None,
          authenticated: bool = True) -> dict[str, Any]:
    headers = {"Accept": "application/json"}
    if authenticated:
        headers["Authorization"] = f"Bearer {_token(args).reveal()}"
    try:
        response = httpx.request(method, f"{args.admin.rstrip('/')}{path}", json=body, headers=headers, timeout=args.timeout)
    except httpx.HTTPError as exc:
        raise CliError(f"{args.admin}: {type(exc).__name__}") from None
    try:
        document: dict[str, Any] = response.json()
    except ValueError:
        raise CliError(f"{args.admin}{path}: answered {response.status_code} without JSON") from None
    if response.status_code >= 400:
        raise CliError(f"{document.get('code', response.status_code)}: {document.get('detail', document.get('title', ''))}")
    return document


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(epoch))


def _line(approval: dict[str, Any], values: bool = True) -> str:
    binding = approval["binding"]
    progress = f"{len(approval['approvals'])}/{approval['approvers_required']}"
    group = f" group={approval['group']}" if approval.get("group") else ""
    return (f"{approval['id']}  {approval['status']:<8} {approval['risk']:<8} {binding['method']} {binding['target']}  "
            f"agent={binding['agent']} task={binding['task_id'] or '-'} approvals={progress}{group} "
            f"expires={_when(approval['expires_at'])}\n    reasons: {'; '.join(approval['reasons'])}"
            + "".join(f"\n    {label}: {value}" for label, value in (key_values(approval.get("body")) if values else [])))


def _list(args: argparse.Namespace) -> int:
    document = _call(args, "GET", "/v1/approvals")
    if args.json:
        print(json.dumps(document, indent=2))
        return 0
    approvals = document["approvals"]
    if not approvals:
        print("no pending approvals")
    for approval in approvals:
        print(_line(approval))
    return 0


def _show(args: argparse.Namespace) -> int:
    document = _call(args, "GET", f"/v1/approvals/{args.id}", authenticated=False)
    if args.json:
        print(json.dumps(document, indent=2))
        return 0
    print(_line(document, values=False))
    for line in describe(document.get("body")):
        print(f"    {line}")
    return 0


def _decide(args: argparse.Namespace, verdict: str) -> int:
    document = _call(args, "POST", f"/v1/approvals/{args.id}/{verdict}", {"comment": args.comment or ""})
    print(json.dumps(document, indent=2) if args.json else _line(document))
    return 0


def _approve(args: argparse.Namespace) -> int:
    return _decide(args, "approve")


def _deny(args: argparse.Namespace) -> int:
    return _decide(args, "deny")


def _guarded(action: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            code: int = action(args)
            return code
        except CliError as exc:
            print(f"agent-sidecar approvals: {exc}", file=sys.stderr)
            return 1
    return run


def add_approvals_parser(sub: Any) -> None:
    """Add the ``approvals`` command to the root parser's subcommands."""
    approvals = sub.add_parser("approvals", help="list, show, approve and deny held calls (admin API client)")
    commands = approvals.add_subparsers(dest="approvals_command", required=True)
    for name, action, help_text in (("list", _list, "pending approvals"), ("show", _show, "one approval"),
                                    ("approve", _approve, "approve a held call"), ("deny", _deny, "deny a held call")):
        command = commands.add_parser(name, help=help_text)
        if name != "list":
            command.add_argument("id", help="approval id (ap-...)")
        if name in ("approve", "deny"):
            command.add_argument("--comment", "-m", default="", help="why (kept in the audit log)")
        command.add_argument("--admin", default=os.environ.get(ADMIN_ENV, "http://127.0.0.1:15000"),
                             help=f"admin API base URL (default ${ADMIN_ENV} or http://127.0.0.1:15000)")
        command.add_argument("--token-file", help=f"file holding the approver's bearer token (else ${TOKEN_ENV})")
        command.add_argument("--json", action="store_true", help="print the API's JSON")
        command.add_argument("--timeout", type=float, default=10.0)
        command.set_defaults(func=_guarded(action))
