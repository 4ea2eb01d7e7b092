"""A minimal HTTP/1.1 keep-alive client on asyncio protocols.

The load generator needs to send thousands of calls a second from one Python
process on a 2-core machine; a full client library would spend more CPU than
the proxies under test. One request is outstanding per connection (no
pipelining); answers are framed by Content-Length or chunked encoding.
"""

from __future__ import annotations

import asyncio
import time


class ResponseParser:
    """Incremental parser for one response at a time; ``feed`` returns the status once complete."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.reset()

    def reset(self) -> None:
        self.status = 0
        self.headers_done = False
        self.remaining = -1  # body bytes still expected when framed by Content-Length
        self.chunked = False
        self.close_after = False

    def feed(self, data: bytes) -> int | None:
        self.buffer += data
        if not self.headers_done and not self._parse_head():
            return None
        if self.chunked:
            return self.status if self._consume_chunks() else None
        if len(self.buffer) >= self.remaining:
            del self.buffer[: self.remaining]
            return self.status
        return None

    def _parse_head(self) -> bool:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        del self.buffer[: end + 4]
        self.status = int(head[0].split(" ", 2)[1])
        self.remaining = 0
        for line in head[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                self.remaining = int(value)
            elif name == "transfer-encoding" and "chunked" in value.lower():
                self.chunked = True
            elif name == "connection" and "close" in value.lower():
                self.close_after = True
        self.headers_done = True
        return True

    def _consume_chunks(self) -> bool:
        while True:
            line_end = self.buffer.find(b"\r\n")
            if line_end < 0:
                return False
            size = int(bytes(self.buffer[:line_end]).split(b";")[0], 16)
            if size == 0:
                trailer_end = self.buffer.find(b"\r\n\r\n", line_end)
                if trailer_end == line_end:  # no trailers: "0\r\n\r\n"
                    del self.buffer[: line_end + 4]
                    return True
                if trailer_end < 0:
                    return False
                del self.buffer[: trailer_end + 4]
                return True
            if len(self.buffer) < line_end + 2 + size + 2:
                return False
            del self.buffer[: line_end + 2 + size + 2]


class Connection(asyncio.Protocol):
    """One keep-alive connection; ``request`` sends raw bytes and waits for the whole answer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = ResponseParser()
        self.waiter: asyncio.Future[tuple[int, float]] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        status = self.parser.feed(data)
        if status is None:
            return
        done = time.perf_counter()
        if self.parser.close_after:
            self.close()
        self.parser.reset()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((status, done))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection lost"))

    async def request(self, raw: bytes) -> tuple[int, float]:
        """Send one request; return (status, perf_counter when the answer was complete)."""
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self.waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


async def connect(host: str, port: int) -> Connection:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(Connection, host, port)
    return protocol
