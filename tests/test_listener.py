"""The proxy listener under slow, greedy and malformed clients: raw sockets against a real sidecar."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness import SidecarFactory
from harness import EchoTool

FAST_LIMITS = {"max_body_bytes": 1024 * 1024, "header_timeout_seconds": 0.3, "body_timeout_seconds": 0.3,
               "idle_timeout_seconds": 0.3, "max_connections": 3}


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    """Everything the sidecar sends until it closes the connection (bounded: a hang fails the test)."""
    return await asyncio.wait_for(reader.read(), timeout=20)


def problem_of(answer: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"content-type: application/problem+json" in head.lower()
    document: dict[str, Any] = json.loads(body)
    return status, document


async def test_a_request_head_that_trickles_in_is_cut_off_with_408(make_sidecar: SidecarFactory) -> None:
    running = await make_sidecar(limits={**FAST_LIMITS, "idle_timeout_seconds": 30})
    reader, writer = await connect(running.sidecar.config.proxy.port)
    writer.write(b"GET /crm/customers/1 HTTP/1.1\r\nHo")
    await writer.drain()
    status, problem = problem_of(await read_to_eof(reader))
    assert status == 408 and problem["code"] == "request_timeout"
    writer.close()


async def test_a_body_that_never_completes_is_refused_with_408(make_sidecar: SidecarFactory, echo_tool: EchoTool) -> None:
    running = await make_sidecar(limits=FAST_LIMITS)
    reader, writer = await connect(running.sidecar.config.proxy.port)
    writer.write(b"POST /crm/customers HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n{\"na")
    await writer.drain()
    status, problem = problem_of(await read_to_eof(reader))
    assert status == 408 and problem["code"] == "request_timeout"
    assert echo_tool.seen == []
    writer.close()


async def test_an_idle_kept_alive_connection_is_closed(make_sidecar: SidecarFactory) -> None:
    running = await make_sidecar(limits=FAST_LIMITS)
    reader, writer = await connect(running.sidecar.config.proxy.port)
    writer.write(b"GET /crm/customers/1 HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    answer = await read_to_eof(reader)  # the answer, then the close once the connection idles
    assert answer.startswith(b"HTTP/1.1 200")
    writer.close()


async def test_connections_past_the_limit_are_refused_and_the_limit_frees_up(make_sidecar: SidecarFactory) -> None:
    running = await make_sidecar(limits={**FAST_LIMITS, "idle_timeout_seconds": 60, "header_timeout_seconds": 60})
    port = running.sidecar.config.proxy.port
    held = [await connect(port) for _ in range(3)]
    reader, writer = await connect(port)
    status, problem = problem_of(await read_to_eof(reader))
    assert status == 503 and problem["code"] == "overloaded"
    writer.close()
    _, first_writer = held.pop()
    first_writer.close()
    await first_writer.wait_closed()
    # The freed slot is usable once the sidecar has seen the close: retry until it has (bounded).
    for _ in range(200):
        reader, writer = await connect(port)
        writer.write(b"GET /crm/customers/1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await writer.drain()
        answer = await read_to_eof(reader)
        writer.close()
        if answer.startswith(b"HTTP/1.1 200"):
            break
    else:
        pytest.fail("a connection slot never became free")
    for _, other in held:
        other.close()


@pytest.mark.parametrize("raw", [
    b"POST /crm/x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /crm/x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"GET /crm/x HTTP/1.1\nHost: x\n\n",
    b"GET /crm/x HTTP/1.1\r\nHost: x\r\nX-Secret-Probe: a\x01b\r\n\r\n",
])
async def test_parser_refusals_are_problems_that_echo_nothing_and_log_one_line(
        make_sidecar: SidecarFactory, echo_tool: EchoTool, raw: bytes, caplog: pytest.LogCaptureFixture) -> None:
    running = await make_sidecar()
    caplog.set_level(logging.DEBUG)
    reader, writer = await connect(running.sidecar.config.proxy.port)
    writer.write(raw)
    await writer.drain()
    answer = await read_to_eof(reader)
    writer.close()
    status, problem = problem_of(answer)
    assert status == 400 and problem["code"] == "bad_request"
    assert b"/crm/x" not in answer and b"X-Secret-Probe" not in answer and b"Content-Length: 4" not in answer
    assert echo_tool.seen == []
    records = [r for r in caplog.records if r.name.startswith(("sidecar", "aiohttp"))]
    assert not any(r.exc_info for r in records), "no traceback per refused request"
    assert [r.getMessage() for r in records if "parser" in r.getMessage()] != []
    assert len([r for r in records if r.levelno >= logging.INFO and "parser" in r.getMessage()]) == 1


async def test_parser_refusals_are_counted_and_audited(make_sidecar: SidecarFactory) -> None:
    running = await make_sidecar()
    reader, writer = await connect(running.sidecar.config.proxy.port)
    writer.write(b"GET /crm/x HTTP/1.1\nHost: x\n\n")
    await writer.drain()
    await read_to_eof(reader)
    writer.close()
    assert await _audit_eventually(running)
    async with httpx.AsyncClient() as client:
        metrics = (await client.get(f"{running.metrics}/metrics")).text
    assert 'agent_sidecar_refusals_total{code="bad_request"} 1.0' in metrics


async def _audit_eventually(running: Any) -> bool:
    """The audit writer is a thread: poll (bounded) until the refusal event is in the file."""
    for _ in range(250):
        text = running.audit_path.read_text() if running.audit_path.exists() else ""
        events = [json.loads(line) for line in text.splitlines() if line.strip()]
        if any(e.get("type") == "refusal" and e.get("code") == "bad_request" for e in events):
            return True
        await asyncio.sleep(0.02)
    return False


async def test_the_test_harness_starts_a_sidecar_again_when_its_chosen_port_was_taken(tmp_path: Path) -> None:
    """free_port() cannot reserve a port: when another socket takes it first, start_sidecar picks new ones."""
    import socket

    from harness import sidecar_config, start_sidecar

    config = sidecar_config(tmp_path, "http://127.0.0.1:9")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config["listeners"]["admin"] = f"127.0.0.1:{taken.getsockname()[1]}"
        running = await start_sidecar(tmp_path, config)
        try:
            assert config["listeners"]["admin"] != f"127.0.0.1:{taken.getsockname()[1]}"
            assert f"127.0.0.1:{running.sidecar.config.admin.port}" == config["listeners"]["admin"]
            async with httpx.AsyncClient() as client:
                assert (await client.get(f"{running.metrics}/healthz")).status_code == 200
        finally:
            await running.sidecar.stop()
