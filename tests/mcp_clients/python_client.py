"""An agent's MCP client, the Python SDK (1.x or 2.x: whichever the interpreter running this has),
driven step by step by tests/test_mcp_clients.py.

    python python_client.py URL TASK_ID PLAN_JSON

TASK_ID "" sends no X-Agent-Task. PLAN_JSON is a list of steps: {"do": "list"}, {"do": "call", "tool": NAME, "arguments": {...}}, or
{"do": "pause", "name": NAME}. For each step one JSON line is printed to stdout: what the client's
user sees (the tools listed; the CallToolResult's text, isError and _meta; or the error the SDK raised,
with its code and data). A pause prints {"paused": NAME} and waits for one line on stdin, so the test
can approve a held call, or change a tool on the server, before the plan goes on.
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any

import anyio
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

STEP_DEADLINE_SECONDS = 60  # a step that has not finished by then is reported, not waited for forever


def emit(line: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def seen_result(result: Any) -> dict[str, Any]:
    """A CallToolResult as the user of the SDK reads it."""
    dumped = result.model_dump(mode="json", by_alias=True, exclude_none=True)
    return {"isError": bool(dumped.get("isError", False)),
            "texts": [block.get("text") for block in dumped.get("content", []) if block.get("type") == "text"],
            "meta": dumped.get("_meta"), "structuredContent": dumped.get("structuredContent")}


def seen_error(error: BaseException) -> dict[str, Any]:
    data = getattr(error, "error", None)  # McpError (1.x) / MCPError (2.x) carry the JSON-RPC ErrorData
    if data is not None and hasattr(data, "code"):
        return {"error": {"code": data.code, "message": data.message, "data": data.data}}
    return {"exception": f"{type(error).__name__}: {error}"[:2000]}


async def step(session: ClientSession, plan_step: dict[str, Any]) -> dict[str, Any]:
    try:
        with anyio.fail_after(STEP_DEADLINE_SECONDS):
            if plan_step["do"] == "list":
                listed = await session.list_tools()
                return {"tools": [{"name": t.name, "description": t.description} for t in listed.tools]}
            return seen_result(await session.call_tool(plan_step["tool"], plan_step.get("arguments", {})))
    except Exception as error:  # what the SDK raised is what its user sees
        return seen_error(error)


async def main(url: str, task: str, plan: list[dict[str, Any]]) -> None:
    import mcp

    version = getattr(mcp, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version
        version = dist_version("mcp")
    emit({"client": "python", "sdk": version})
    http_client = create_mcp_http_client(headers={"X-Agent-Task": task} if task else None)
    try:
        async with http_client, streamable_http_client(url, http_client=http_client) as streams:
            async with ClientSession(streams[0], streams[1]) as session:
                with anyio.fail_after(STEP_DEADLINE_SECONDS):
                    await session.initialize()
                for index, plan_step in enumerate(plan):
                    if plan_step["do"] == "pause":
                        emit({"paused": plan_step["name"]})
                        await anyio.to_thread.run_sync(sys.stdin.readline)
                        continue
                    emit({"step": index, **await step(session, plan_step)})
    except BaseException as error:  # the session itself died: the ExceptionGroup an agent would get
        emit({"fatal": f"{type(error).__name__}: {error}"[:2000],
              "traceback": "".join(traceback.format_exception(error))[-4000:]})
        raise SystemExit(3)
    emit({"done": True})


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
