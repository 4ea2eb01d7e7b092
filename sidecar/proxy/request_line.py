"""Request lines checked byte for byte before aiohttp's parser reads them (RFC 9112 section 3).

aiohttp's parser (llhttp) reads more than ``method SP request-target SP HTTP-version CRLF``: it skips runs
of spaces around the target and a lone CR or LF before the method, reads a line without a version as
HTTP/0.9 and ``RTSP/1.0`` as HTTP/1.0. ``GET /crm/  HTTP/1.1`` is ``/crm/`` to it, and may be ``/crm/ ``
(or a refusal) to another server: so a request line that is not exactly one token, one SP, a target of
visible bytes, one SP, ``HTTP/1.0`` or ``HTTP/1.1`` and CRLF is refused ``bad_request``, never reinterpreted.

Which bytes are a request line depends on where the message before ended, so the gate follows the framing
of the stream: a head ends at its first empty line, its body is Content-Length bytes or a chunked body, and
the next head starts after it, once empty lines (CRLF) are skipped (RFC 9112 section 2.2). A body is never
read as a request line. A request line is held until it is complete (or refused as soon as it cannot become
valid), so the parser never reads one that was not checked; the rest of a head passes on as it comes, and
its framing fields are read before the parser can reach the body.

Where the gate cannot tell where the next message starts, it stops reading the stream and that message is
the connection's last (the listener closes the connection once it is answered): after a CONNECT or a head
with Upgrade (what follows may not be HTTP), header fields longer than MAX_HEAD_BYTES, framing that is not a
plain Content-Length or ``Transfer-Encoding: chunked`` (the parser refuses most of it anyway), and a chunked
body with trailer fields (aiohttp's parser hands the last one to the next request as one of its headers).
"""

from __future__ import annotations

import re

from ..problems import Refusal

MAX_HEAD_BYTES = 64 * 1024  # a longer header section is passed on unread, as its connection's last message
MAX_FRAMING_LINE = 8 * 1024  # a longer chunk-size or trailer line ends the reading, as MAX_HEAD_BYTES does
LINE_SLACK = 64  # the method, two spaces, the version and CRLF around a target of the parser's max_line_size

_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_TARGET = rb"[\x21-\x7e\x80-\xff]+"  # visible bytes: which of them a target may hold is decided later
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") " + _TARGET + rb" HTTP/1\.[01]\r\n")
_VERSION_START = b"|".join(re.escape(b"HTTP/1."[:n]) for n in range(8)) + rb"|HTTP/1\.[01]\r?"
# What a request line (or an empty line) can start with: anything else is refused before its end arrives.
_LINE_START = re.compile(rb"\r?|" + _TOKEN + rb"(?: (?:" + _TARGET + rb"(?: (?:" + _VERSION_START + rb"))?)?)?")
_EMPTY_LINES = re.compile(rb"(?:\r\n)+")
_EMPTY_LINES_WINDOW = 4096
_FRAMING_FIELD = re.compile(rb"\n(?i:(content-length|transfer-encoding|upgrade)):([^\r\n]*)")
_CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:;[^\r\n]*)?\r\n")

_MAX_LENGTH_DIGITS = 20  # 2**64 has 20 digits: a longer Content-Length (leading zeros aside) is one llhttp refuses
_CHUNKED = -1  # a body length meaning: chunked
_UNFRAMED = -2  # a body length meaning: the gate cannot tell where the body ends

# What the gate is reading (plain ints: an Enum member costs a class lookup at each test, on the hot path).
_LINE = 1  # a request line, or an empty line before one: held until it is complete
_FIELDS = 2  # the rest of a head: passed on, and copied while it spans reads
_BODY = 3  # Content-Length bytes
_CHUNK_SIZE = 4  # a chunk-size line
_CHUNK_DATA = 5
_CHUNK_END = 6  # the CRLF after a chunk's data
_TRAILERS = 7  # after the last chunk: its empty line (a trailer field ends the reading)
_UNREAD = 8  # the rest of the stream is passed on unread
_REFUSED = 9  # nothing more is passed on


class RequestLineGate:
    """One connection's byte stream, followed message by message, on its way to the parser."""

    def __init__(self, max_line_size: int) -> None:
        self.max_line_bytes = max_line_size + LINE_SLACK
        self.heads = 0  # complete heads passed on so far
        self.last_head: int | None = None  # once the gate stopped reading: the number of the last head it read
        self._mode = _LINE
        self._held = b""  # the start of a request line, not passed on yet
        self._scanned = 0  # how much of the held line holds no LF
        self._checked = 0  # how much of the held line was last checked for a valid start
        self._connect = False  # the head being read is a CONNECT
        self._fields = bytearray()  # the head's fields so far, while they span reads (passed on already)
        self._remaining = 0  # bytes left in a Content-Length body or a chunk
        self._carry = bytearray()  # the start of a framing line split across reads (passed on already)
        self._refusal: Refusal | None = None

    def admit(self, data: bytes) -> tuple[bytes, Refusal | None]:
        """Of the stream's next bytes: those the parser may read now, and the refusal of the head after them."""
        mode = self._mode
        if mode == _UNREAD:
            return data, None
        if mode == _REFUSED or not data:
            return b"", None
        buffer = data
        if self._held:
            buffer, self._held = self._held + data, b""
        passed = self._follow(buffer)
        if passed < len(buffer) and self._mode == _LINE:
            self._held = buffer[passed:]
        refusal, self._refusal = self._refusal, None
        return (buffer if passed == len(buffer) else buffer[:passed]), refusal

    def _follow(self, buffer: bytes) -> int:
        """How many bytes of ``buffer`` may pass: all, unless a request line is incomplete or refused."""
        position, end = 0, len(buffer)
        while position < end:
            mode = self._mode
            if mode == _LINE:
                after = self._request_line(buffer, position)
                if after is None:
                    return position
                position = after
            elif mode == _FIELDS:
                position = self._head_fields(buffer, position)
            elif mode == _BODY or mode == _CHUNK_DATA:
                position = self._skip(position, end)
            elif mode == _UNREAD:
                return end
            else:
                if mode == _CHUNK_SIZE and not self._carry:
                    position = _after_whole_chunks(buffer, position)
                position = self._framing_line(buffer, position)
        return position

    # ---------------------------------------------------------------- heads

    def _request_line(self, buffer: bytes, start: int) -> int | None:
        """Check the request line at ``start``: where reading goes on, or None (incomplete, or refused)."""
        if buffer[start] == 0x0D and (after := _after_empty_lines(buffer, start)) > start:
            self._scanned = self._checked = 0
            return after  # empty lines before the request line are skipped, as the parser does
        newline = buffer.find(b"\n", start + self._scanned)
        if newline < 0:
            self._partial_line(buffer, start)
            return None
        self._scanned = self._checked = 0
        line = _REQUEST_LINE.fullmatch(buffer, start, newline + 1)
        if line is None:
            self._refuse(Refusal("bad_request", "the request line is not exactly: method SP request-target SP "
                                                "HTTP/1.1 (or HTTP/1.0) CRLF, with no other space or control byte"))
            return None
        self._connect = line.group(1) == b"CONNECT"
        self._mode = _FIELDS
        return newline - 1  # the fields are read from the line's CRLF: a head without fields ends there

    def _partial_line(self, buffer: bytes, start: int) -> None:
        """Refuse a request line that is too long or cannot become valid, without waiting for its end."""
        self._scanned = length = len(buffer) - start
        if length > self.max_line_bytes:
            self._refuse(Refusal("headers_too_large", f"the request line is longer than {self.max_line_bytes} bytes"))
        elif length >= 2 * self._checked:  # checked again each time it doubles: linear in all however it trickles
            self._checked = length
            if not _LINE_START.fullmatch(buffer, start):
                self._refuse(Refusal("bad_request", "the request line is not exactly: method SP request-target SP "
                                                    "HTTP/1.1 (or HTTP/1.0) CRLF, with no other space or control byte"))

    def _head_fields(self, buffer: bytes, position: int) -> int:
        """Pass the head's fields on; where the head ends, or the end of ``buffer`` while it goes on."""
        fields = self._fields
        if not fields:
            end = buffer.find(b"\r\n\r\n", position)
            if end >= 0:
                self._head_read(buffer, position, end + 4)
                return end + 4
            fields += buffer[position:]
        else:
            seen = len(fields)
            fields += buffer[position:]
            end = fields.find(b"\r\n\r\n", max(seen - 3, 0))
            if end >= 0:
                self._head_read(fields, 0, end + 4)
                fields.clear()
                return position + end + 4 - seen
        if len(fields) > MAX_HEAD_BYTES:
            self.heads += 1
            self._stop_reading()
        return len(buffer)

    def _head_read(self, head: bytes | bytearray, start: int, end: int) -> None:
        """The fields from ``start`` (the request line's CRLF) to ``end`` are the whole of them: what follows?"""
        self.heads += 1
        if end - start > MAX_HEAD_BYTES or self._connect:
            self._stop_reading()
            return
        length = _body_length(head, start + 1, end)
        if length == _UNFRAMED:
            self._stop_reading()
        elif length == _CHUNKED:
            self._mode = _CHUNK_SIZE
        elif length > 0:
            self._mode, self._remaining = _BODY, length
        else:
            self._mode = _LINE

    def _refuse(self, refusal: Refusal) -> None:
        self._mode, self._refusal = _REFUSED, refusal

    def _stop_reading(self) -> None:
        self._mode, self.last_head = _UNREAD, self.heads
        self._fields.clear()
        self._carry.clear()

    # ---------------------------------------------------------------- bodies

    def _skip(self, position: int, end: int) -> int:
        taken = min(self._remaining, end - position)
        self._remaining -= taken
        if not self._remaining:
            self._mode = _LINE if self._mode == _BODY else _CHUNK_END
        return position + taken

    def _framing_line(self, buffer: bytes, position: int) -> int:
        """Read a chunk-size line, the CRLF after a chunk or a trailer line; the bytes pass either way."""
        newline = buffer.find(b"\n", position)
        if newline < 0:
            self._carry += buffer[position:]
            if len(self._carry) > MAX_FRAMING_LINE:
                self._stop_reading()
            return len(buffer)
        line = buffer[position:newline + 1]
        if self._carry:
            line = bytes(self._carry) + line
            self._carry.clear()
        if len(line) > MAX_FRAMING_LINE:
            self._stop_reading()
        else:
            self._after_framing_line(line)
        return newline + 1

    def _after_framing_line(self, line: bytes) -> None:
        mode = self._mode
        if mode == _CHUNK_SIZE:
            size = _CHUNK_SIZE_LINE.fullmatch(line)
            if size is None:
                self._stop_reading()  # the parser refuses it
                return
            self._remaining = int(size.group(1), 16)
            self._mode = _CHUNK_DATA if self._remaining else _TRAILERS
        elif line == b"\r\n":
            self._mode = _CHUNK_SIZE if mode == _CHUNK_END else _LINE
        else:
            # Chunk data longer than its size (the parser refuses it), or a trailer field: aiohttp's parser
            # carries the last trailer field over into the next request's headers, so none may follow.
            self._stop_reading()


def _after_whole_chunks(buffer: bytes, position: int) -> int:
    """Skip the whole chunks (size line, data, CRLF) at ``position``: many small chunks cost one loop each,
    not three state changes. The last chunk, and anything unusual, is left to the state machine."""
    match_size = _CHUNK_SIZE_LINE.match
    while (size_line := match_size(buffer, position)) is not None and size_line.end() - position <= MAX_FRAMING_LINE:
        data_end = size_line.end() + int(size_line.group(1), 16)
        if data_end == size_line.end() or not buffer.startswith(b"\r\n", data_end):
            break
        position = data_end + 2
    return position


def _after_empty_lines(buffer: bytes, start: int) -> int:
    """Where the empty lines (CRLF) at ``start`` end, up to a window: runs of them are skipped at C speed."""
    window = buffer[start:start + _EMPTY_LINES_WINDOW]
    run = len(window) - len(window.lstrip(b"\r\n"))
    if window.count(b"\r\n", 0, run) * 2 == run:  # the run is CRLF pairs alone
        return start + run
    pairs = _EMPTY_LINES.match(window)
    return start + (pairs.end() if pairs is not None else 0)


def _body_length(head: bytes | bytearray, fields_from: int, end: int) -> int:
    """The body length the head's fields declare: bytes, _CHUNKED, or _UNFRAMED (Upgrade, or framing
    that is not one plain Content-Length or ``Transfer-Encoding: chunked``)."""
    length: int | None = None
    chunked = False
    for name, value in _FRAMING_FIELD.findall(head, fields_from, end):
        name, value = name.lower(), value.strip(b" \t")
        if name == b"upgrade" or length is not None or chunked:
            return _UNFRAMED
        if name == b"transfer-encoding":
            if value.lower() != b"chunked":
                return _UNFRAMED
            chunked = True
        elif value.isdigit():
            digits = value.lstrip(b"0")  # llhttp reads leading zeros; int() refuses more than 4300 digits
            if len(digits) > _MAX_LENGTH_DIGITS:
                return _UNFRAMED  # more than 64 bits: the parser refuses it
            length = int(digits or b"0")
        else:
            return _UNFRAMED
    return _CHUNKED if chunked else length or 0
