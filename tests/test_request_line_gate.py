"""The request-line gate on its own (sidecar/proxy/request_line.py): where a stream is cut into reads never
changes what passes, what is refused, or where the gate stops reading. The listener's use of it, on real
sockets, is in tests/adversarial/test_request_lines_pipelined.py and the corpus's ``reqline-*`` cases; only here can
every cut of a stream be tried (TCP may join two writes into one read)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sidecar.problems import Refusal
from sidecar.proxy.request_line import MAX_FRAMING_LINE, MAX_HEAD_BYTES, RequestLineGate

MAX_LINE_SIZE = 8190
LOOK_ALIKE = b"GET /crm/  HTTP/1.1\r\nHost: x\r\n\r\n\tGET\t/payments HTTP/1.1\r\n"

GOOD = (b"GET /crm/customers/1 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /crm/notes HTTP/1.1\r\nHost: x\r\ncontent-length:  " + str(len(LOOK_ALIKE)).encode() + b" \r\n\r\n"
        + LOOK_ALIKE + b"\r\n\r\n"  # empty lines before the next request line
        b"POST /crm/notes HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n\r\n"
        b"10;a=\"b c\"\r\n" + LOOK_ALIKE[:16] + b"\r\n"
        + f"{len(LOOK_ALIKE) - 16:x}".encode() + b"\r\n" + LOOK_ALIKE[16:] + b"\r\n"
        b"0;note=\"GET /crm/  HTTP/1.1\"\r\n\r\n"
        b"PUT /crm/notes/1 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(b"1\r\n" + bytes([byte]) + b"\r\n" for byte in b"GET  /x HTTP/1.1\r\n") + b"0\r\n\r\n"
        b"GET /crm/customers/2 HTTP/1.0\r\n\r\n")
GOOD_HEADS = 5
BAD = b"GET /crm/customers/3  HTTP/1.1\r\nHost: x\r\n\r\n"
AFTER = b"GET /crm/customers/4 HTTP/1.1\r\nHost: x\r\n\r\n"


def cuts(stream: bytes) -> Iterator[list[bytes]]:
    """The stream whole, cut once at every byte, and one byte per read."""
    yield [stream]
    for at in range(1, len(stream)):
        yield [stream[:at], stream[at:]]
    yield [stream[at:at + 1] for at in range(len(stream))]


def follow(reads: list[bytes]) -> tuple[bytes, list[Refusal], RequestLineGate]:
    gate = RequestLineGate(MAX_LINE_SIZE)
    admitted, refusals = [], []
    for data in reads:
        passed, refusal = gate.admit(data)
        admitted.append(passed)
        if refusal is not None:
            refusals.append(refusal)
    return b"".join(admitted), refusals, gate


def test_a_well_formed_stream_passes_whole_however_it_is_cut() -> None:
    for reads in cuts(GOOD):
        admitted, refusals, gate = follow(reads)
        assert (admitted, refusals, gate.heads, gate.last_head) == (GOOD, [], GOOD_HEADS, None), reads


def test_a_bad_request_line_stops_the_stream_where_its_head_starts_however_it_is_cut() -> None:
    for reads in cuts(GOOD + BAD + AFTER):
        admitted, refusals, gate = follow(reads)
        assert admitted == GOOD, reads
        assert [r.code for r in refusals] == ["bad_request"] and gate.heads == GOOD_HEADS, reads


@pytest.mark.parametrize("line", [
    b"GET /crm/  HTTP/1.1", b"GET  /crm/ HTTP/1.1", b" GET /crm/ HTTP/1.1", b"\tGET /crm/ HTTP/1.1",
    b"\nGET /crm/ HTTP/1.1", b"\rGET /crm/ HTTP/1.1", b"GET\t/crm/ HTTP/1.1", b"GET /crm/\tHTTP/1.1",
    b"GET\x0b/crm/ HTTP/1.1", b"GET\x0c/crm/ HTTP/1.1", b"GET\r /crm/ HTTP/1.1", b"GET /crm/ HTTP/1.1 ",
    b"GET /crm/ HTTP/1.1\r", b"GET /crm/a\x00b HTTP/1.1", b"GET /crm/a\x7fb HTTP/1.1", b"GET /crm/",
    b"GET /crm/ HTTP/0.9", b"GET /crm/ HTTP/2.0", b"GET /crm/ HTTP/1.2", b"GET /crm/ RTSP/1.0", b"GET /crm/ http/1.1",
    b"G@T /crm/ HTTP/1.1", b"GET", b"Host: x",
])
def test_anything_but_method_sp_target_sp_version_crlf_is_refused(line: bytes) -> None:
    admitted, refusals, _ = follow([line + b"\r\nHost: x\r\n\r\n"])
    assert admitted == b"" and [r.code for r in refusals] == ["bad_request"]


@pytest.mark.parametrize("line", [b"get /crm/ HTTP/1.1", b"FOO /crm/ HTTP/1.0", b"GET http://crm.example.com/a?b=%20 HTTP/1.1",
                                  b"CONNECT crm.example.com:443 HTTP/1.1", b"OPTIONS * HTTP/1.1", b"GET /caf\xc3\xa9 HTTP/1.1"])
def test_the_grammar_alone_is_checked_here(line: bytes) -> None:
    """Unknown methods, target forms and non-ASCII bytes are refused later, each with its own code."""
    stream = line + b"\r\nHost: x\r\n\r\n"
    assert follow([stream])[:2] == (stream, [])


@pytest.mark.parametrize("start", [b"GET /crm/ HTTP/1.1\rHost: x\r\r", b"\x16\x03\x01\x02\x00\x01", b"GET  /crm", b" GET",
                                   b"GET /crm/ HTTP/1.1 ", b"GET /crm/ HTTP/2", b"\r\r"])
def test_a_request_line_that_cannot_become_valid_is_refused_before_it_ends(start: bytes) -> None:
    """As the parser would refuse it: a client waiting for an answer gets one, not the head timeout."""
    admitted, refusals, _ = follow([start])
    assert admitted == b"" and [r.code for r in refusals] == ["bad_request"]


@pytest.mark.parametrize("start", [b"\r", b"G", b"GET", b"GET ", b"GET /crm/", b"GET /crm/ ", b"GET /crm/ HTTP/1.", b"GET /crm/ HTTP/1.1\r"])
def test_the_start_of_a_request_line_is_held_until_it_ends(start: bytes) -> None:
    assert follow([start])[:2] == (b"", [])


def test_the_fields_of_a_head_pass_as_they_come() -> None:
    """Only the request line is held: the parser reads (and refuses at once) whatever follows it."""
    start = b"GET /crm/ HTTP/1.1\r\nHost: x\r\nX-A: 1"
    assert follow([start])[:2] == (start, [])


def test_a_request_line_longer_than_the_parser_reads_is_refused_before_it_ends() -> None:
    admitted, refusals, _ = follow([b"GET /"] + [b"a" * 4096] * 3)
    assert admitted == b"" and [r.code for r in refusals] == ["headers_too_large"]


@pytest.mark.parametrize("fields", [
    b"Upgrade: h2c\r\nConnection: Upgrade\r\n", b"Upgrade: websocket\r\n",
    b"Content-Length: 3\r\nContent-Length: 3\r\n", b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n", b"Transfer-Encoding: \r\n", b"Content-Length: +3\r\n",
])
def test_after_a_message_it_cannot_frame_the_gate_reads_no_further(fields: bytes) -> None:
    stream = b"POST /crm/notes HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n" + BAD + AFTER
    for reads in cuts(stream):
        admitted, refusals, gate = follow(reads)
        assert (admitted, refusals, gate.last_head) == (stream, [], 1), reads


def test_after_trailer_fields_the_gate_reads_no_further() -> None:
    """aiohttp's parser hands a request's last trailer field to the next request as a header of its own."""
    stream = (b"POST /crm/notes HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-Agent-Task: t\r\n\r\n"
              + AFTER)
    for reads in cuts(stream):
        admitted, refusals, gate = follow(reads)
        assert (admitted, refusals, gate.last_head) == (stream, [], 1), reads


def test_after_a_connect_the_gate_reads_no_further() -> None:
    stream = b"GET /a HTTP/1.1\r\n\r\nCONNECT crm.example.com:443 HTTP/1.1\r\nContent-Length: 2\r\n\r\n\x16\x03" + BAD
    admitted, refusals, gate = follow([stream])
    assert (admitted, refusals, gate.heads, gate.last_head) == (stream, [], 2, 2)


def test_a_head_longer_than_the_gate_holds_passes_unread_as_the_last_message() -> None:
    stream = b"GET /a HTTP/1.1\r\n" + b"X-Filler: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n" + BAD
    for at in (20, MAX_HEAD_BYTES // 2, MAX_HEAD_BYTES + 10, len(stream)):
        admitted, refusals, gate = follow([stream[:at], stream[at:]])
        assert (admitted, refusals, gate.last_head) == (stream, [], 1), at


def test_a_chunk_line_longer_than_the_gate_follows_ends_its_reading() -> None:
    extension = b";x=" + b"a" * MAX_FRAMING_LINE
    stream = b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1" + extension + b"\r\nz\r\n0\r\n\r\n" + BAD
    for at in (60, MAX_FRAMING_LINE + 60, len(stream)):
        admitted, refusals, gate = follow([stream[:at], stream[at:]])
        assert (admitted, refusals, gate.last_head) == (stream, [], 1), at


def test_chunk_data_longer_than_its_size_ends_the_reading() -> None:
    stream = b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nzz\r\n0\r\n\r\n" + BAD
    admitted, refusals, gate = follow([stream])
    assert (admitted, refusals, gate.last_head) == (stream, [], 1)


def test_a_content_length_of_many_leading_zeros_is_followed_as_the_parser_reads_it() -> None:
    """llhttp reads any number of leading zeros; int() refuses a string of more than 4300 digits."""
    stream = b"POST /a HTTP/1.1\r\nContent-Length: " + b"0" * 5000 + b"3\r\n\r\nabc" + BAD
    admitted, refusals, gate = follow([stream])
    assert (admitted, [r.code for r in refusals], gate.heads, gate.last_head) == (stream[:-len(BAD)], ["bad_request"], 1, None)


def test_after_a_content_length_of_more_than_64_bits_the_gate_reads_no_further() -> None:
    stream = b"POST /a HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\nabc" + BAD
    admitted, refusals, gate = follow([stream])
    assert (admitted, refusals, gate.last_head) == (stream, [], 1)
