"""An upstream tool that records every byte it receives: no HTTP library between the wire and the test.

Each request is read as an ordinary HTTP/1.1 server would: the request line, the header lines as sent
(names and values as bytes, in order, duplicates kept), then the body by Content-Length (or chunked,
recorded as such). The answer is ``200`` with a small JSON body, and the connection stays open for the
next request. A few switches make it misbehave for fault tests:

- ``reset_before_answer``: read the request, then reset the connection (RST) without answering;
- ``hold``: an asyncio.Event the upstream waits on before answering (a slow upstream, released by the test);
- ``answer_delay_seconds``: answer after a delay (for timeout tests; never used to synchronise).
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from dataclasses import dataclass, field

MAX_LINE = 64 * 1024
MAX_HEADERS = 200


@dataclass(frozen=True)
class Received:
    """One request exactly as it arrived."""

    request_line: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    chunked: bool = False
    connection: int = 0  # which accepted connection it came on (1, 2, ...)

    @property
    def method(self) -> str:
        return self.request_line.split(b" ", 1)[0].decode("latin-1")

    @property
    def target(self) -> str:
        """The request-target exactly as received (latin-1, so every byte maps to one character)."""
        parts = self.request_line.split(b" ")
        return parts[1].decode("latin-1") if len(parts) == 3 else ""

    @property
    def version(self) -> str:
        return self.request_line.rsplit(b" ", 1)[-1].decode("latin-1")

    def header(self, name: str) -> list[str]:
        """Every value of a header, compared case-insensitively by name, in arrival order."""
        wanted = name.lower().encode("latin-1")
        return [value.decode("latin-1") for key, value in self.headers if key.lower() == wanted]

    def header_names(self) -> list[str]:
        return [key.decode("latin-1") for key, _ in self.headers]


@dataclass
class RawUpstream:
    host: str = "127.0.0.1"
    port: int = 0
    received: list[Received] = field(default_factory=list)
    reset_before_answer: bool = False
    hold: asyncio.Event | None = None
    answer_delay_seconds: float = 0.0
    connections: int = 0
    errors: list[str] = field(default_factory=list)  # requests it could not parse (the sidecar sent bad HTTP)
    _server: asyncio.Server | None = None
    _arrivals: asyncio.Queue[Received] = field(default_factory=asyncio.Queue)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=MAX_LINE)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()

    async def next_request(self, timeout: float = 30.0) -> Received:
        """The next request to arrive (already recorded in ``received``); the timeout is only a safety net."""
        return await asyncio.wait_for(self._arrivals.get(), timeout)

    def drain(self) -> list[Received]:
        """Forget the arrivals queued so far (``received`` keeps them)."""
        taken: list[Received] = []
        while not self._arrivals.empty():
            taken.append(self._arrivals.get_nowait())
        return taken

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        connection = self.connections
        self._writers.add(writer)
        try:
            while True:
                try:
                    request = await _read_request(reader, connection)
                except _Closed:
                    return
                except _BadRequest as bad:
                    self.errors.append(str(bad))
                    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    await writer.drain()
                    return
                self.received.append(request)
                self._arrivals.put_nowait(request)
                if self.reset_before_answer:
                    _reset(writer)
                    return
                if self.hold is not None:
                    await self.hold.wait()
                if self.answer_delay_seconds:
                    await asyncio.sleep(self.answer_delay_seconds)
                body = json.dumps({"tool": "raw", "seen": len(self.received)}).encode()
                head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
                writer.write(head if request.method == "HEAD" else head + body)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._writers.discard(writer)
            if not writer.is_closing():
                writer.close()


class _Closed(Exception):
    """The peer closed the connection between requests."""


class _BadRequest(Exception):
    pass


async def _line(reader: asyncio.StreamReader) -> bytes:
    try:
        line = await reader.readuntil(b"\r\n")
    except asyncio.LimitOverrunError:
        raise _BadRequest("line too long") from None
    return line[:-2]


async def _read_request(reader: asyncio.StreamReader, connection: int) -> Received:
    try:
        request_line = await _line(reader)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise _Closed() from None
        raise _BadRequest("connection closed inside the request line") from None
    if request_line.count(b" ") != 2:
        raise _BadRequest(f"malformed request line {request_line[:200]!r}")
    headers: list[tuple[bytes, bytes]] = []
    while True:
        line = await _line(reader)
        if not line:
            break
        if len(headers) >= MAX_HEADERS:
            raise _BadRequest("too many headers")
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise _BadRequest(f"malformed header line {line[:200]!r}")
        headers.append((name, value.strip(b" \t")))
    lengths = [v for k, v in headers if k.lower() == b"content-length"]
    encodings = [v for k, v in headers if k.lower() == b"transfer-encoding"]
    if encodings:
        if lengths or [e.lower() for e in encodings] != [b"chunked"]:
            raise _BadRequest("ambiguous framing")
        body = await _read_chunked(reader)
        return Received(request_line, tuple(headers), body, chunked=True, connection=connection)
    if len(lengths) > 1 or (lengths and not lengths[0].isdigit()):
        raise _BadRequest("bad Content-Length")
    length = int(lengths[0]) if lengths else 0
    body = await reader.readexactly(length) if length else b""
    return Received(request_line, tuple(headers), body, connection=connection)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    while True:
        size_line = (await _line(reader)).split(b";", 1)[0].strip()
        try:
            size = int(size_line, 16)
        except ValueError:
            raise _BadRequest("bad chunk size") from None
        if size == 0:
            while await _line(reader):  # trailers
                pass
            return b"".join(chunks)
        chunks.append(await reader.readexactly(size))
        if await _line(reader):
            raise _BadRequest("chunk not followed by CRLF")


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST instead of FIN: SO_LINGER with a zero timeout."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
