"""Request Content-Encoding: refused unless the route allows the coding; then decoded once, judged, and
forwarded as judged (decoded bytes, no Content-Encoding), never a 500 for a broken body."""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Any

import httpx
import pytest

from harness import EchoTool, SidecarFactory, open_task

LIMIT = 64 * 1024


async def gzip_sidecar(make_sidecar: SidecarFactory, echo_tool: EchoTool) -> Any:
    return await make_sidecar(limits={"max_body_bytes": LIMIT}, routes=[
        {"name": "crm", "match": {"path_prefix": "/crm"}, "upstream": f"{echo_tool.base}/crm",
         "content_encodings": ["gzip", "deflate"]},
        {"name": "plain", "match": {"path_prefix": "/plain"}, "upstream": f"{echo_tool.base}/plain"}])


async def post(url: str, body: bytes, encoding: str, task: str | None = None) -> httpx.Response:
    headers = {"Content-Type": "application/json", "Content-Encoding": encoding}
    if task:
        headers["X-Agent-Task"] = task
    async with httpx.AsyncClient() as agent:
        return await agent.post(url, content=body, headers=headers)


@pytest.mark.parametrize("encode, coding", [(gzip.compress, "gzip"), (zlib.compress, "deflate")])
async def test_an_allowed_coding_is_decoded_once_judged_and_forwarded_decoded(
        make_sidecar: SidecarFactory, echo_tool: EchoTool, encode: Any, coding: str) -> None:
    sc = await gzip_sidecar(make_sidecar, echo_tool)
    task = await open_task(sc.admin)
    document = b'{"name": "Ada"}'
    response = await post(f"{sc.proxy}/crm/customers", encode(document), coding, task)
    assert response.status_code == 200, response.text
    [seen] = echo_tool.seen
    assert seen.body == document
    assert "content-encoding" not in seen.headers


async def test_the_policy_judges_the_decoded_body(make_sidecar: SidecarFactory, echo_tool: EchoTool) -> None:
    sc = await gzip_sidecar(make_sidecar, echo_tool)
    task = await open_task(sc.admin)
    document = json.dumps({"name": "Ada"}).encode()
    await post(f"{sc.proxy}/crm/customers", gzip.compress(document), "gzip", task)
    events = [json.loads(line) for line in sc.audit_path.read_text().splitlines()]
    [decision] = [e for e in events if e.get("type") == "decision"]
    assert decision["input"]["request"]["body"] == {"name": "Ada"}
    assert decision["input"]["request"]["body_size"] == len(document)


@pytest.mark.parametrize("path, body, coding, code", [
    ("/plain/x", gzip.compress(b"{}"), "gzip", "unsupported_encoding"),  # the route allows no coding
    ("/crm/x", gzip.compress(gzip.compress(b"{}")), "gzip, gzip", "unsupported_encoding"),  # stacked
    ("/crm/x", b"{}", "br", "unsupported_encoding"),
    ("/crm/x", b"this is not gzip", "gzip", "bad_request"),
    ("/crm/x", gzip.compress(b"{}")[:-6], "gzip", "bad_request"),  # truncated
    ("/crm/x", gzip.compress(b"{}") + gzip.compress(b"{}"), "gzip", "bad_request"),  # a second member
    ("/crm/x", gzip.compress(b" " * (LIMIT + 1)), "gzip", "body_too_large"),  # small on the wire, large decoded
])
async def test_codings_that_could_be_read_two_ways_or_not_at_all_are_refused(
        make_sidecar: SidecarFactory, echo_tool: EchoTool, path: str, body: bytes, coding: str, code: str) -> None:
    sc = await gzip_sidecar(make_sidecar, echo_tool)
    task = await open_task(sc.admin)
    response = await post(f"{sc.proxy}{path}", body, coding, task)
    assert response.status_code in (400, 413, 415), response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == code
    assert echo_tool.seen == []
