"""CONNECT: blind tunnels for routes that explicitly allow one (decided on host and port alone),
and the hand-off to TLS interception for routes with ``intercept_tls``.

aiohttp parses CONNECT as an upgrade: after the 200, the bytes the agent sends
reach a parser set on the connection, which pipes them to the upstream socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl

from aiohttp import web

from ..problems import Refusal
from ..tls_ca import CaError
from .listener import GuardedRequestHandler
from .tls import LeafRefused

log = logging.getLogger("sidecar.proxy.tunnel")

_BUFFERED_CHUNKS = 64  # back-pressure bound: at most this many chunks wait for the upstream


class _Pipe:
    """The connection's payload parser once upgraded: agent bytes go into a bounded queue."""

    def __init__(self, queue: asyncio.Queue[bytes | None]) -> None:
        self.queue = queue

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        try:
            self.queue.put_nowait(bytes(data))
        except asyncio.QueueFull:
            return True, b""  # the agent outruns the upstream: end the tunnel rather than buffer unbounded
        return False, b""

    def feed_eof(self) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(None)


async def run_tunnel(request: web.BaseRequest, host: str, port: int, idle_timeout: float = 300.0) -> web.Response:
    try:
        upstream_reader, upstream_writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
    except (OSError, asyncio.TimeoutError):
        raise Refusal("upstream_error", f"tunnel upstream {host}:{port} unreachable") from None
    transport = request.transport
    if transport is None:
        upstream_writer.close()
        return web.Response(status=499)
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=_BUFFERED_CHUNKS)
    request.protocol.set_parser(_Pipe(queue))  # type: ignore[arg-type]  # any feed_data/feed_eof parser works
    transport.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")

    async def agent_to_upstream() -> None:
        while (chunk := await asyncio.wait_for(queue.get(), idle_timeout)) is not None:
            upstream_writer.write(chunk)
            await upstream_writer.drain()
        upstream_writer.write_eof()

    async def upstream_to_agent() -> None:
        while chunk := await asyncio.wait_for(upstream_reader.read(65536), idle_timeout):
            if request.transport is None:
                return
            request.transport.write(chunk)

    tasks = [asyncio.ensure_future(agent_to_upstream()), asyncio.ensure_future(upstream_to_agent())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        upstream_writer.close()
        if request.transport is not None:
            request.transport.close()
    return web.Response(status=200)


def intercept_tunnel(request: web.BaseRequest, host: str, port: int) -> web.Response:
    """Answer the CONNECT with 200 and terminate TLS with a leaf for ``host``; the connection is the TLS
    layer's from here, so the response returned is never written."""
    protocol = request.protocol
    if not isinstance(protocol, GuardedRequestHandler):
        raise Refusal("internal_error", "this listener cannot intercept TLS")
    try:
        protocol.intercept_connect(host, port)
    except LeafRefused as exc:
        raise Refusal("tunnel_denied", str(exc)) from None
    except (CaError, OSError, ssl.SSLError, ValueError, RuntimeError) as exc:
        log.warning("no leaf certificate for %s: %s", host[:255], type(exc).__name__)
        raise Refusal("internal_error", f"no certificate could be issued for {host[:255]} ({type(exc).__name__})") from None
    return web.Response(status=200)
