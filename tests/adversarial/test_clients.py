"""Ordinary agent HTTP clients through the strict parser: everything they send is forwarded, exactly as judged.

Issue 13 began with httpx: a comma in a query made 300 of 300 tokens fail the tool's binding check. Strict
canonicalisation must not refuse what ordinary clients send, and what they send must arrive, be judged and be
bound byte for byte. Each client (httpx, aiohttp, urllib) sends the same calls: query values with commas,
spaces, slashes, ``?``, ``;``, ``%`` and non-ASCII text, non-ASCII path segments, JSON and form bodies.
"""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

import aiohttp
import httpx
import pytest
from adversarial_kit import Answer, Outcome, Stack, assert_forwarded

Call = tuple[str, str, dict[str, str] | None, Any, str | None]  # method, path, params, body, kind ("json"/"form")

CALLS: list[Call] = [
    ("GET", "/crm/customers/42", {"fields": "name,email"}, None, None),
    ("GET", "/crm/search", {"q": "café au lait", "next": "/a/b?c=d"}, None, None),
    ("GET", "/crm/search", {"q": "100% sure; really", "tag": "a+b&c=d"}, None, None),
    ("GET", "/crm/customers/Zoë", None, None, None),
    ("POST", "/crm/notes", {"draft": "1"}, {"text": "hi, there", "n": 3}, "json"),
    ("POST", "/crm/notes", None, {"text": "a b", "n": "1"}, "form"),
]

Client = Callable[[Stack, Call, str], tuple[int, dict[str, str], bytes]]


def with_httpx(stack: Stack, call: Call, task: str) -> tuple[int, dict[str, str], bytes]:
    method, path, params, body, kind = call
    extra: dict[str, Any] = {"json": body} if kind == "json" else {"data": body} if kind == "form" else {}
    response = httpx.request(method, stack.sidecar.proxy + path, params=params, headers={"X-Agent-Task": task},
                             timeout=30, **extra)
    return response.status_code, dict(response.headers), response.content


def with_aiohttp(stack: Stack, call: Call, task: str) -> tuple[int, dict[str, str], bytes]:
    method, path, params, body, kind = call
    extra: dict[str, Any] = {"json": body} if kind == "json" else {"data": body} if kind == "form" else {}

    async def send() -> tuple[int, dict[str, str], bytes]:
        async with aiohttp.ClientSession() as session:
            async with session.request(method, stack.sidecar.proxy + path, params=params,
                                       headers={"X-Agent-Task": task}, **extra) as response:
                return response.status, dict(response.headers), await response.read()

    return stack.run(send())


def with_urllib(stack: Stack, call: Call, task: str) -> tuple[int, dict[str, str], bytes]:
    import json

    method, path, params, body, kind = call
    url = stack.sidecar.proxy + urllib.parse.quote(path) + (f"?{urllib.parse.urlencode(params)}" if params else "")
    headers = {"X-Agent-Task": task}
    data: bytes | None = None
    if kind == "json":
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    elif kind == "form":
        data, headers["Content-Type"] = urllib.parse.urlencode(body).encode(), "application/x-www-form-urlencoded"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback only
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


CLIENTS: dict[str, Client] = {"httpx": with_httpx, "aiohttp": with_aiohttp, "urllib": with_urllib}



@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("call", CALLS, ids=[f"{c[0]}-{c[1]}-{c[4] or 'query'}-{i}" for i, c in enumerate(CALLS)])
def test_an_ordinary_client_call_is_forwarded_as_judged(stack: Stack, client: str, call: Call) -> None:
    task = stack.open_task()
    stack.upstream.drain()
    before = len(stack.upstream.received)
    mark = stack.logs.mark()
    status, headers, body = CLIENTS[client](stack, call, task)
    answer = Answer(status, "", list(headers.items()), body)
    outcome = Outcome(answer, stack.upstream.received[before:], stack.logs.since(mark))
    received = assert_forwarded(stack, outcome, method=call[0])
    assert received.target.startswith("/api" + call[1].split("Zo")[0]), received.target
