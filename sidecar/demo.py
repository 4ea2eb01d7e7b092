"""`make run`: the sidecar on its embedded defaults, a demo tool, and the whole story a newcomer can follow.

Starts a demo upstream tool on 127.0.0.1:18080, a demo MCP server on 127.0.0.1:18081 (the official
`mcp` SDK, streamable HTTP; the `demo` extra) and the sidecar from examples/demo.yaml (embedded OPA,
rego/, state in .state/, a generated development signing key, a development approver key), then
plays one task: an allowed call, a denied call, a held call; a human approver (a second identity,
not the agent) approves it with `agent-sidecar approvals approve`; the retried call goes through
exactly once. Then the same task through MCP, with the SDK's own client: tools/list, an allowed
read tool, a destructive tool held, approved by the same human, and the plain retry reaching the
tool exactly once. The task is completed, which revokes its credentials; and `agent-sidecar audit
show` tells the task's story. It prints each command so a person can do every step by hand, then
keeps serving.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shlex
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import yaml
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .app import build_sidecar
from .config import Config, ConfigError, load_config
from .credentials.keys import public_jwk, thumbprint

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "examples" / "demo.yaml"
TOOL_PORT = 18080
MCP_PORT = 18081  # the demo MCP server; examples/demo.yaml's route `tools` points at it
MCP_ROUTE_PREFIX = "/tools"  # the agent's MCP URL is the sidecar's proxy + /tools/mcp
MCP_PROBLEM = "dev.agent-sidecar/problem"  # where a refused tools/call carries the problem document
APPROVER = "dev-approver@example.com"  # the human; the agent is the config's identity.static
APPROVER_GROUPS = ["approvers"]
APPROVER_TOKEN_HOURS = 12


# ---------------------------------------------------------------- development files (never for production)


@dataclass(frozen=True)
class DevApprover:
    """A development identity provider for approvers: a P-256 key, its JWKS, a token signed with it."""

    key_path: Path
    jwks_path: Path
    token_path: Path
    issuer: str
    audience: str
    group_claim: str

    def mint_token(self, subject: str = APPROVER, hours: int = APPROVER_TOKEN_HOURS) -> Path:
        key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        now = int(time.time())
        claims = {"iss": self.issuer, "aud": self.audience, "sub": subject, self.group_claim: APPROVER_GROUPS,
                  "preferred_username": subject.split("@")[0], "iat": now, "exp": now + hours * 3600}
        token = jwt.encode(claims, key, algorithm="ES256", headers={"kid": thumbprint(public_jwk(key))})
        _write_private(self.token_path, token + "\n")
        return self.token_path


def _write_private(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``, readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".new")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, path)


def _resolve(config_path: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else Path(os.path.normpath(config_path.parent / path))


def prepare_dev_files(config_path: Path) -> DevApprover | None:
    """Generate what the demo config names but nobody has made yet: the approver key and JWKS, a fresh
    approver token, and the introspection token file. Runs before the config is loaded (it checks them)."""
    try:
        raw = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None  # load_config reports it properly
    if not isinstance(raw, dict):
        return None
    introspection = raw.get("introspection") or {}
    if isinstance(introspection, dict) and isinstance(introspection.get("tokens_file"), str):
        tokens_file = _resolve(config_path, introspection["tokens_file"])
        if not tokens_file.exists():
            _write_private(tokens_file, secrets.token_urlsafe(32) + "\n")
    approvers = (raw.get("approvals") or {}).get("approvers") if isinstance(raw.get("approvals"), dict) else None
    if not isinstance(approvers, dict) or not isinstance(approvers.get("jwks"), str) \
            or approvers["jwks"].startswith(("http://", "https://")):
        return None
    jwks_path = _resolve(config_path, approvers["jwks"])
    approver = DevApprover(key_path=jwks_path.parent / "approver-key.pem", jwks_path=jwks_path,
                           token_path=jwks_path.parent / "approver.token", issuer=str(approvers.get("issuer", "")),
                           audience=str(approvers.get("audience", "")),
                           group_claim=str(approvers.get("group_claim") or "groups"))
    if not approver.key_path.exists():
        _write_private(approver.key_path, ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode())
    key = serialization.load_pem_private_key(approver.key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    jwk = public_jwk(key)
    jwks = {"keys": [{**jwk, "kid": thumbprint(jwk), "alg": "ES256", "use": "sig"}]}
    if not jwks_path.exists() or json.loads(jwks_path.read_text(encoding="utf-8")) != jwks:
        jwks_path.parent.mkdir(parents=True, exist_ok=True)
        jwks_path.write_text(json.dumps(jwks, indent=2) + "\n", encoding="utf-8")
    approver.mint_token()
    return approver


# ---------------------------------------------------------------- the demo tool


@dataclass
class DemoTool:
    """An upstream tool that shows what reached it: the credential's claims, never the token itself."""

    received: dict[str, int] = field(default_factory=dict)  # "METHOD path" -> times received
    tokens: dict[str, str] = field(default_factory=dict)  # "METHOD path" -> the last credential (for introspection)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        authorization = request.headers.get("Authorization", "")
        claims: dict[str, Any] | None = None
        if authorization.startswith("Bearer "):
            try:
                claims = jwt.decode(authorization[7:], options={"verify_signature": False})
                self.tokens[f"{request.method} {request.path}"] = authorization[7:]
            except jwt.PyJWTError:
                claims = None
        body = await request.read()
        call = f"{request.method} {request.path_qs}"
        self.received[call] = self.received.get(call, 0) + 1
        return web.json_response({
            "tool saw": call,
            "times the tool received this call": self.received[call],
            "credential": "a sidecar-minted JWT" if claims else ("something else" if authorization else "none"),
            "claims": claims,
            "x-agent-decision": request.headers.get("X-Agent-Decision"),
            "agent's own secret reached the tool": "agent-own-secret" in authorization or "agent-own-secret" in str(request.headers),
            "body_bytes": len(body),
        })


def demo_tool() -> web.Application:
    return DemoTool().app()


# ---------------------------------------------------------------- the demo MCP server


def mcp_sdk_missing() -> str | None:
    """Why the MCP part cannot play (the `mcp` SDK is the `demo` extra), or None when it can."""
    try:
        import mcp.server.mcpserver  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        return f"{exc}; install the demo extra: {_shown(Path(sys.executable).parent / 'pip')} install -e '.[demo]'"
    return None


@dataclass
class DemoMcpTools:
    """An MCP server on the official SDK (streamable HTTP) with a read tool and a destructive one; it
    counts what reached it, so the demo can show that an approved call ran exactly once."""

    ran: dict[str, int] = field(default_factory=dict)  # "tool(arguments)" -> times the tool ran

    def times(self, tool: str, **arguments: Any) -> int:
        return self.ran.get(_call_text(tool, arguments), 0)

    def app(self) -> Any:
        """The server's ASGI app (stateless, JSON answers): POST /mcp."""
        from mcp.server.mcpserver import MCPServer
        from mcp.types import ToolAnnotations

        server = MCPServer("crm-tools", log_level="WARNING")  # it configures the root logger: keep the story readable

        @server.tool(annotations=ToolAnnotations(read_only_hint=True))
        def get_customer(customer_id: int) -> str:
            """Look a customer up by id."""
            self._count("get_customer", customer_id=customer_id)
            return json.dumps({"id": customer_id, "name": "Ada Lovelace", "duplicate_of": 42})

        @server.tool(annotations=ToolAnnotations(destructive_hint=True))
        def delete_customer(customer_id: int) -> str:
            """Delete a customer record for good."""
            times = self._count("delete_customer", customer_id=customer_id)
            return f"deleted customer {customer_id} (this tool ran delete_customer for it {times} time(s))"

        return server.streamable_http_app(stateless_http=True, json_response=True)

    def _count(self, tool: str, **arguments: Any) -> int:
        call = _call_text(tool, arguments)
        self.ran[call] = self.ran.get(call, 0) + 1
        return self.ran[call]


def _call_text(tool: str, arguments: dict[str, Any]) -> str:
    return f"{tool}({', '.join(f'{key}={value!r}' for key, value in sorted(arguments.items()))})"


@contextlib.asynccontextmanager
async def serving_mcp(tools: DemoMcpTools, port: int) -> AsyncIterator[str]:
    """Serve the demo MCP server with uvicorn, in this event loop, on 127.0.0.1 only; yield its URL."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield  # the demo handles Ctrl-C itself and stops this server

    listening = socket.create_server(("127.0.0.1", port))  # bound here: a taken port is a plain OSError
    server = Server(uvicorn.Config(tools.app(), log_config=None, log_level="warning", access_log=False, lifespan="on"))
    serving = asyncio.create_task(server.serve(sockets=[listening]))
    while not server.started:
        if serving.done():
            listening.close()
            serving.result()  # it could not start: raise why
            raise RuntimeError(f"the demo MCP server on 127.0.0.1:{port} stopped at start-up")
        await asyncio.sleep(0.01)  # readiness poll of an in-process server
    try:
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        server.should_exit = True
        await serving


# ---------------------------------------------------------------- the story


def show(title: str, response: httpx.Response) -> None:
    print(f"\n=== {title}")
    print(f"<-- HTTP {response.status_code} {response.headers.get('content-type', '')}")
    try:
        print(json.dumps(response.json(), indent=2)[:1800])
    except ValueError:
        print(response.text[:500])


def _shown(path: Path) -> str:
    """A path as a person at the repository root would type it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _cli() -> str:
    script = Path(sys.executable).parent / "agent-sidecar"
    return _shown(script) if script.exists() else "agent-sidecar"


async def _run_cli(title: str, argv: list[str], admin: str) -> tuple[int, str]:
    """Run an ``agent-sidecar`` command as its own process (as a person would), print it and its output."""
    print(f"\n=== {title}")
    print(f"$ {_cli()} {shlex.join(argv)}")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "AGENT_SIDECAR_ADMIN": admin}, cwd=Path.cwd())
    output, _ = await process.communicate()
    text = output.decode("utf-8", "replace")
    print(text.rstrip())
    return process.returncode or 0, text


@dataclass
class Story:
    config: Config
    approver: DevApprover | None
    tool: DemoTool
    proxy: str
    admin: str
    mcp_tools: DemoMcpTools | None = None  # None: the MCP part is skipped, for the reason in mcp_missing
    mcp_upstream: str = ""
    mcp_missing: str | None = None
    task_id: str = ""
    approval_id: str = ""
    steps: int = 0

    def step(self, title: str) -> str:
        """The next step's numbered title."""
        self.steps += 1
        return f"{self.steps}. {title}"


async def play(story: Story) -> None:
    proxy, admin = story.proxy, story.admin
    async with httpx.AsyncClient(timeout=30) as agent:
        task = (await agent.post(f"{admin}/v1/tasks", json={
            "intent": "look up customers 42 and 7 and tidy their records", "ttl_seconds": 3600})).json()
        story.task_id = task["id"]
        print(f"\nOpened task {task['id']}: {task['intent']!r}")

        print(f"\n--> GET {proxy}/crm/customers/42  (X-Agent-Task, and the agent's own 'Authorization: Bearer agent-own-secret')")
        show(story.step("allowed: the tool got a credential minted for this one call; the agent's header was stripped"),
             await agent.get(f"{proxy}/crm/customers/42",
                             headers={"X-Agent-Task": task["id"], "Authorization": "Bearer agent-own-secret"}))

        print(f"\n--> POST {proxy}/crm/customers  (no task)")
        show(story.step("denied, with the policy's reasons (problem+json)"),
             await agent.post(f"{proxy}/crm/customers", json={"name": "Ada"}))

        print(f"\n--> DELETE {proxy}/crm/customers/42  (X-Agent-Task)")
        held = await agent.delete(f"{proxy}/crm/customers/42", headers={"X-Agent-Task": task["id"]})
        show(story.step("held for human approval: not forwarded; an approval id to retry with"), held)
        story.approval_id = str(held.json().get("approval_id", ""))
        if story.approver is None or not story.approval_id:
            print("\n(no approvers configured: the held call stays held)")
        else:
            await _approve_and_retry(story, agent)

        await play_mcp(story)
        await _complete(story, agent)


async def _approve(story: Story, approval_id: str, why: str, comment: str) -> bool:
    """A human approves ``approval_id`` with the real CLI and the development approver token."""
    assert story.approver is not None
    token_file = _shown(story.approver.token_path)
    code, _ = await _run_cli(story.step(f"approved by a human, {APPROVER} ({why})"),
                             ["approvals", "approve", approval_id, "--token-file", token_file, "-m", comment], story.admin)
    if code != 0:
        print("(the approval was refused; the held call stays held)")
    return code == 0


async def _approve_and_retry(story: Story, agent: httpx.AsyncClient) -> None:
    proxy, task_id, approval_id = story.proxy, story.task_id, story.approval_id
    if not await _approve(story, approval_id, "a second identity: the agent can never approve its own call",
                          "customer 42 is a duplicate"):
        return
    retry = {"X-Agent-Task": task_id, "X-Agent-Approval": approval_id}
    print(f"\n--> DELETE {proxy}/crm/customers/42  (X-Agent-Task, X-Agent-Approval: {approval_id})")
    show(story.step("the retried call went through, with a credential minted for it; the tool received it once"),
         await agent.delete(f"{proxy}/crm/customers/42", headers=retry))
    print(f"\n--> DELETE {proxy}/crm/customers/42  (the same approval again)")
    show(story.step("exactly once: the approval is spent, the second retry is refused and never forwarded"),
         await agent.delete(f"{proxy}/crm/customers/42", headers=retry))
    print(f"\nthe tool received DELETE /crm/customers/42 {story.tool.received.get('DELETE /crm/customers/42', 0)} time(s)")


async def _complete(story: Story, agent: httpx.AsyncClient) -> None:
    admin, task_id = story.admin, story.task_id
    credential = story.tool.tokens.get("DELETE /crm/customers/42")
    introspection = _introspection_token(story.config)
    before = await _introspect(agent, admin, introspection, credential)
    print(f"\n--> POST {admin}/v1/tasks/{task_id}/complete")
    show(story.step("the task is complete: every credential issued for it is revoked"),
         await agent.post(f"{admin}/v1/tasks/{task_id}/complete"))
    after = await _introspect(agent, admin, introspection, credential)
    if before is not None and after is not None:
        print(f"\nthe tool asks POST {admin}/introspect about the DELETE's credential: "
              f"before completion active={before}, after completion active={after}")

    audit_argv = ["audit", "show", "--task", task_id, "--config", _shown(story.config.source)]
    await _run_cli(story.step("the task's whole story, from the hash-chained audit log"), audit_argv, admin)


# ---------------------------------------------------------------- the story, through MCP


async def play_mcp(story: Story) -> None:
    """The same task through MCP, as an agent runs it: the SDK's client, the task as a static header.
    tools/list, an allowed read tool, a destructive tool held, approved, and the plain retry run once."""
    tools = story.mcp_tools
    if tools is None:
        print(f"\n(the MCP part is skipped: {story.mcp_missing})")
        return
    from mcp.client.session import ClientSession
    # Re-exported here (as the tests and the SDK's examples import it), not listed in the module's __all__.
    from mcp.client.streamable_http import create_mcp_http_client  # type: ignore[attr-defined]
    from mcp.client.streamable_http import streamable_http_client

    url = f"{story.proxy}{MCP_ROUTE_PREFIX}/mcp"
    print(f"\nThe same task through MCP. The agent's MCP client (the mcp SDK: ClientSession, streamable HTTP) "
          f"connects to {url} with X-Agent-Task as a static header; the sidecar judges each JSON-RPC request "
          f"and forwards to the demo MCP server at {story.mcp_upstream}.")
    client = create_mcp_http_client(headers={"X-Agent-Task": story.task_id})
    client.event_hooks["request"].append(_print_sent)
    client.event_hooks["response"].append(_print_received)
    async with client, streamable_http_client(url, http_client=client) as streams:
        async with ClientSession(streams[0], streams[1]) as session:
            print("\n--> session.initialize()  (the SDK's handshake: initialize, then notifications/initialized)")
            await session.initialize()

            print("\n--> session.list_tools()")
            listed = await session.list_tools()
            print(f"\n=== {story.step('MCP tools/list: a read; the sidecar pins each tool definition for the task')}")
            for tool in listed.tools:
                hints = tool.annotations.model_dump(by_alias=True, exclude_none=True) if tool.annotations else {}
                print(f"    {tool.name}: {tool.description!r}  server's hints {json.dumps(hints)}")
            print("    (the route pins get_customer readOnlyHint and delete_customer destructiveHint in "
                  "examples/demo.yaml: a server's claim that a tool is read-only is not believed by default)")

            read = {"customer_id": 7}
            print(f"\n--> session.call_tool('get_customer', {read})")
            show_tool_result(story.step("MCP allowed: get_customer is read-only, forwarded with a credential minted "
                                        "for the call"), await session.call_tool("get_customer", read))
            print(f"\nthe MCP server ran get_customer(customer_id=7) {tools.times('get_customer', **read)} time(s)")

            delete = {"customer_id": 7}
            print(f"\n--> session.call_tool('delete_customer', {delete})")
            held = await session.call_tool("delete_customer", delete)
            show_tool_result(story.step("MCP held for human approval: delete_customer is destructive; the model reads "
                                        "an error result (HTTP 200), the tool is not called"), held)
            print(f"\nthe MCP server ran delete_customer(customer_id=7) {tools.times('delete_customer', **delete)} time(s)")
            approval_id = str(((held.meta or {}).get(MCP_PROBLEM) or {}).get("approval_id", ""))
            if story.approver is None or not approval_id:
                print("\n(no approvers configured: the held tool call stays held)")
                return
            if not await _approve(story, approval_id, "the same human, in the same queue as the REST call",
                                  "customer 7 duplicates 42"):
                return

            print(f"\n--> session.call_tool('delete_customer', {delete})  again, as a plain retry: the SDK sends a "
                  "new JSON-RPC id and no approval header")
            show_tool_result(story.step("MCP approved call went through: the same tool with the same arguments "
                                        "used the approval, once"), await session.call_tool("delete_customer", delete))
            print(f"\nthe MCP server ran delete_customer(customer_id=7) {tools.times('delete_customer', **delete)} "
                  "time(s); the same call again would be held afresh, as a new approval")


async def _print_sent(request: Any) -> None:
    """The MCP client's request as it leaves for the sidecar: the HTTP method, the URL, the JSON-RPC message."""
    try:
        message = json.loads(request.content) if request.content else None
    except ValueError:
        message = None
    if isinstance(message, dict):
        shown = {key: message[key] for key in ("id", "method", "params") if key in message}
        if message.get("method") != "tools/call":
            shown.pop("params", None)  # initialize's capabilities and client info: long, and not the point
        print(f"    sent:     {request.method} {request.url}  {json.dumps(shown)}")
    else:
        print(f"    sent:     {request.method} {request.url}")


async def _print_received(response: Any) -> None:
    print(f"    received: HTTP {response.status_code} {response.headers.get('content-type', '')}")


def show_tool_result(title: str, result: Any) -> None:
    """A CallToolResult as the agent's model gets it: isError, the text, and the sidecar's problem if refused."""
    from mcp.types import TextContent

    print(f"\n=== {title}")
    print(f"<-- CallToolResult isError={bool(result.is_error)}")
    for block in result.content:
        print(f"    text: {block.text[:600]}" if isinstance(block, TextContent) else f"    {block.type} block")
    problem = (result.meta or {}).get(MCP_PROBLEM)
    if isinstance(problem, dict):
        brief = {key: problem[key] for key in ("code", "approval_id", "decision_id", "reasons") if key in problem}
        print(f"    _meta[{MCP_PROBLEM!r}]: {json.dumps(brief)[:900]}")


def _introspection_token(config: Config) -> str | None:
    if config.introspection.tokens:
        return config.introspection.tokens[0].reveal()
    path = config.introspection.tokens_file
    if path is None:
        return None
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines[0] if lines else None


async def _introspect(agent: httpx.AsyncClient, admin: str, bearer: str | None, token: str | None) -> bool | None:
    if bearer is None or token is None:
        return None
    answer = await agent.post(f"{admin}/introspect", data={"token": token},
                              headers={"Authorization": f"Bearer {bearer}"})
    return bool(answer.json().get("active")) if answer.status_code == 200 else None


def by_hand(story: Story) -> str:
    """The commands a person types to do each step of the story themselves."""
    proxy, admin, config = story.proxy, story.admin, story.config
    cli = _cli()
    audit = f"{cli} audit show --task \"$TASK\" --config {_shown(config.source)}"
    lines = [
        "",
        "The sidecar keeps serving (Ctrl-C to stop). Do each step by hand:",
        "",
        "  # an agent opens a task (declared intent) and makes calls through the proxy",
        f"  TASK=$(curl -s -X POST {admin}/v1/tasks -H 'content-type: application/json' \\",
        "      -d '{\"intent\": \"tidy customer 7\", \"ttl_seconds\": 900}' | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"id\"])')",
        f"  curl -s {proxy}/crm/customers/7 -H \"X-Agent-Task: $TASK\"                    # allowed",
        f"  curl -s -x {proxy} http://crm.example.com/customers/7 -H \"X-Agent-Task: $TASK\"   # forward-proxy mode",
        f"  curl -s -X POST {proxy}/crm/customers -H 'content-type: application/json' -d '{{}}'   # denied: no task",
        f"  curl -s -X DELETE {proxy}/crm/customers/7 -H \"X-Agent-Task: $TASK\"         # held: note approval_id",
    ]
    if story.approver is not None:
        token = _shown(story.approver.token_path)
        lines += [
            "",
            f"  # a human approves it: the CLI, with the development approver token ({APPROVER})",
            f"  export AGENT_SIDECAR_ADMIN={admin}",
            f"  {cli} approvals list --token-file {token}",
            f"  {cli} approvals approve ap-... --token-file {token} -m 'checked with the owner'",
            f"  # or the approver page: open {config.approvals.page_url or f'{admin}/ui/'} and paste the token printed by",
            f"  cat {token}",
            f"  # a new token when it expires ({APPROVER_TOKEN_HOURS} h): {_shown(Path(sys.executable))} -m sidecar.demo --approver-token",
            "",
            "  # the agent retries with the approval: forwarded once; again: approval_used",
            f"  curl -s -X DELETE {proxy}/crm/customers/7 -H \"X-Agent-Task: $TASK\" -H 'X-Agent-Approval: ap-...'",
        ]
    if story.mcp_tools is not None:
        call = '{{"jsonrpc": "2.0", "id": {id}, "method": "tools/call", "params": {{"name": "{tool}", "arguments": {{"customer_id": 7}}}}}}'
        lines += [
            "",
            f"  # the same task through MCP: JSON-RPC over streamable HTTP to the demo MCP server ({story.mcp_upstream})",
            f"  mcp() {{ curl -s {proxy}{MCP_ROUTE_PREFIX}/mcp -H 'content-type: application/json' \\",
            "      -H 'accept: application/json, text/event-stream' -H \"X-Agent-Task: $TASK\" -d \"$1\"; echo; }",
            "  mcp '{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": \"tools/list\"}'",
            f"  mcp '{call.format(id=2, tool='get_customer')}'     # allowed",
            f"  mcp '{call.format(id=3, tool='delete_customer')}'  # held: isError, approval id in the text",
            "  # approve it as above, then send the same call again (any id, no header): it runs once",
        ]
    lines += [
        "",
        "  # the task ends: its credentials are revoked; then its story",
        f"  curl -s -X POST {admin}/v1/tasks/$TASK/complete",
        f"  {audit}",
        f"  {cli} audit verify {_shown(config.audit_path)}",
        "",
        f"  curl -s {admin}/.well-known/jwks.json",
        f"  curl -s http://{config.metrics}/readyz",
        f"  curl -s http://{config.metrics}/metrics | grep agent_sidecar_requests_total",
        "",
    ]
    return "\n".join(lines)


async def main(argv: list[str] | None = None) -> int:
    options = arguments().parse_args(argv)
    config_path = Path(options.config)
    approver = prepare_dev_files(config_path)
    if options.approver_token:
        if approver is None:
            print(f"{config_path}: configures no approvers JWKS file", file=sys.stderr)
            return 2
        print(f"wrote a new approver token for {APPROVER} to {_shown(approver.token_path)} "
              f"(valid {APPROVER_TOKEN_HOURS} h)")
        return 0
    try:
        config = load_config(config_path)
        sidecar = build_sidecar(config)
    except ConfigError as exc:
        print(f"agent-sidecar: config error: {exc}", file=sys.stderr)
        return 2
    tool = DemoTool()
    async with contextlib.AsyncExitStack() as running:
        runner = web.AppRunner(tool.app(), access_log=None)
        await runner.setup()
        running.push_async_callback(runner.cleanup)
        story = Story(config=config, approver=approver, tool=tool, proxy=f"http://{config.proxy}",
                      admin=f"http://{config.admin}", mcp_missing=mcp_sdk_missing())
        try:
            await web.TCPSite(runner, "127.0.0.1", options.tool_port).start()
            if story.mcp_missing is None:
                story.mcp_tools = DemoMcpTools()
                story.mcp_upstream = await running.enter_async_context(serving_mcp(story.mcp_tools, options.mcp_port))
        except OSError as exc:
            print(f"agent-sidecar demo: the demo tool (127.0.0.1:{options.tool_port}) or the demo MCP server "
                  f"(127.0.0.1:{options.mcp_port}) cannot listen: {exc}", file=sys.stderr)
            return 2
        await sidecar.start()
        running.push_async_callback(sidecar.stop)
        print(f"demo tool on http://127.0.0.1:{options.tool_port}; "
              + (f"demo MCP server on {story.mcp_upstream}; " if story.mcp_upstream else "")
              + f"sidecar proxy {story.proxy}, admin {story.admin}, metrics http://{config.metrics}; "
              f"config {_shown(config.source)}")
        if approver is not None:
            print(f"development approver {APPROVER}: key and JWKS in {_shown(approver.key_path.parent)}/ "
                  "(never use in production)")
        await play(story)
        print(by_hand(story), flush=True)
        if options.once:
            return 0
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    return 0


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sidecar.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEMO_CONFIG), help="sidecar config (default: examples/demo.yaml)")
    parser.add_argument("--tool-port", type=int, default=TOOL_PORT, help="port of the demo tool the routes point at")
    parser.add_argument("--mcp-port", type=int, default=MCP_PORT,
                        help="port of the demo MCP server (127.0.0.1) the route `tools` points at")
    parser.add_argument("--once", action="store_true", help="play the demo and exit instead of serving on")
    parser.add_argument("--approver-token", action="store_true",
                        help="write a fresh development approver token (and the key, if missing) and exit")
    return parser


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
