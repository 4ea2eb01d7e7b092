"""A JSON-RPC message the sidecar classified as a response (no "method" key, a "result" or an "error")
while an MCP server decoding with Go's encoding/json reads it as a request.

Go's encoding/json matches object keys to struct tags ignoring case (documented: "preferring an exact match
but also accepting a case-insensitive match"), so {"Method": "tools/call", "Params": {...}} decodes with
Method="tools/call". The official Go MCP SDK shipped internal/jsonrpc2/strict.go for exactly this
("prevents message smuggling attacks that exploit Go's case-insensitive JSON unmarshalling"); servers built
on older releases, and on mark3labs/mcp-go (json.Unmarshal into {jsonrpc, method, id, result}), still
dispatch such a message by its method. The sidecar's parse_calls looked only at the exact key "method":
the message is a "(response)", the policy judges a response, it is not a request of the batch either, and
the bytes go to the upstream. The sidecar already assumes case-insensitive upstreams elsewhere (the
interceptor refuses keys equal ignoring case; measures match keys ignoring case).

Real parts: httpx as the agent, the embedded engine with the fixture policy (which denies the MCP tool
delete_all), an upstream that reads JSON-RPC keys the way Go does and records the tools it would run.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from aiohttp import web

from harness import EchoTool


def go_field(message: dict[str, Any], tag: str) -> Any:
    """encoding/json: the exact key if present, else the first key equal to the tag ignoring case."""
    if tag in message:
        return message[tag]
    return next((value for key, value in message.items() if key.lower() == tag.lower()), None)


@dataclass
class GoStyleMcpServer(EchoTool):
    """What a Go MCP server dispatches: by Method, decoded case-insensitively (mcp-go's HandleMessage shape)."""

    ran: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        answers = []
        for message in body if isinstance(body, list) else [body]:
            method, params = go_field(message, "method"), go_field(message, "params") or {}
            if method == "tools/call" and go_field(message, "id") is not None:
                self.ran.append(str(go_field(params, "name")))
                answers.append({"jsonrpc": "2.0", "id": go_field(message, "id"),
                                "result": {"content": [{"type": "text", "text": "done"}]}})
        if not answers:
            return web.Response(status=202)
        return web.json_response(answers if isinstance(body, list) else answers[0])


@pytest.fixture
async def go_server() -> AsyncIterator[GoStyleMcpServer]:
    server = GoStyleMcpServer()
    await server.start()
    yield server
    await server.stop()


DENIED_CALL = {"name": "delete_all", "arguments": {}}
ALLOWED_CALL = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "get_weather", "arguments": {}}}

SMUGGLED = {
    "single-with-result": {"jsonrpc": "2.0", "id": 7, "Method": "tools/call", "Params": DENIED_CALL, "result": {}},
    "single-with-error": {"jsonrpc": "2.0", "id": 7, "METHOD": "tools/call", "params": DENIED_CALL,
                          "error": {"code": 0, "message": "x"}},
    # Two requests judged as one call of the task: the batch rule counts only the exact key "method".
    "batch-beside-a-request": [ALLOWED_CALL,
                               {"jsonrpc": "2.0", "id": 8, "Method": "tools/call", "Params": DENIED_CALL, "result": {}}],
}


@pytest.mark.parametrize("body", list(SMUGGLED.values()), ids=list(SMUGGLED))
async def test_a_case_variant_request_is_not_judged_as_a_response(make_sidecar: Any, go_server: GoStyleMcpServer,
                                                                  body: Any) -> None:
    sc = await make_sidecar(routes=[{"name": "tools", "match": {"path_prefix": "/tools"}, "upstream": go_server.base,
                                     "labels": {"protocol": "mcp"}}])
    async with httpx.AsyncClient() as agent:
        # The fixture policy denies delete_all when it is sent as the request it is:
        plain = await agent.post(f"{sc.proxy}/tools/mcp",
                                 json={"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": DENIED_CALL})
        assert "is not allowed" in plain.text and go_server.ran == [], plain.text
        answer = await agent.post(f"{sc.proxy}/tools/mcp", json=body)
    assert answer.status_code != 500
    assert "delete_all" not in go_server.ran, (
        f"the sidecar judged a message without the exact key 'method' as a response and forwarded it "
        f"(HTTP {answer.status_code}); a Go MCP server ran {go_server.ran}")
