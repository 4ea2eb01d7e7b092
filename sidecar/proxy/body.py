"""The body as the policy sees it: read once, strictly, whatever the agent says it is.

An upstream reads a body by its own rules (many parse JSON whatever the Content-Type,
take the first or the last of two equal keys, match keys ignoring case), so the
sidecar refuses every body that two such readers could understand differently:

- every non-empty body is tried as JSON, read by ``strictjson`` (duplicate keys at any
  depth, keys equal ignoring case, NaN, integers beyond 64 bits, nesting deeper than 128
  levels, lone surrogates and the rest it lists are refused); labelled JSON must parse;
- ``application/x-www-form-urlencoded`` is read as an object of names to strings, with
  the same rules for names, and ``_method`` refused;
- anything else is unreadable: the policy sees ``body: null, body_readable: false``;
- ``Content-Encoding`` is refused unless the route allows that one coding; then it is
  decoded once, and what is judged (the decoded bytes) is what is forwarded.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..problems import Refusal
from ..strictjson import Ambiguous, NotJson, strict_json, unique_members
from .canonical import QUERY_CHARS, canonical_query, query_pairs

SUPPORTED_ENCODINGS = ("gzip", "deflate")


@dataclass(frozen=True)
class BodyView:
    value: Any  # the parsed JSON or form object; None when empty or unreadable
    readable: bool
    kind: str  # empty | json | form | opaque


EMPTY = BodyView(None, True, "empty")
OPAQUE = BodyView(None, False, "opaque")


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def labelled_json(media: str) -> bool:
    return media.endswith("+json") or media.split("/", 1)[-1] == "json"


def read_body(body: bytes, content_type: str) -> BodyView:
    if not body:
        return EMPTY
    media = media_type(content_type)
    if media == "application/x-www-form-urlencoded":
        return BodyView(_form(body), True, "form")
    try:
        return BodyView(strict_json(body), True, "json")
    except NotJson:
        if labelled_json(media):
            raise Refusal("bad_request", "malformed JSON body (labelled JSON but does not parse)") from None
        return OPAQUE


def _form(body: bytes) -> dict[str, str]:
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise Refusal("bad_request", "a form body must be ASCII (non-ASCII is percent-encoded)") from None
    if not QUERY_CHARS.fullmatch(text):
        raise Refusal("bad_request", "character not allowed in the form body")
    canonical_query(text)  # escapes valid, _method refused
    try:
        strict_json(body)
    except NotJson:
        pass
    else:
        raise Refusal("bad_request", "a form body that is also JSON is ambiguous")
    try:
        return unique_members(query_pairs(text))
    except Ambiguous as exc:
        raise Refusal("bad_request", f"ambiguous form body: {exc}") from None


# -- Content-Encoding ------------------------------------------------------------


def content_codings(values: Iterable[str]) -> list[str]:
    codings = [token.strip().lower() for value in values for token in value.split(",")]
    return [c for c in codings if c and c != "identity"]


def decode_content(body: bytes, codings: list[str], allowed: Iterable[str], limit: int) -> bytes:
    """The body with its one allowed coding removed; refused when stacked, not allowed, broken or too large."""
    if not codings:
        return body
    if len(codings) > 1:
        raise Refusal("unsupported_encoding", "stacked content codings are refused")
    coding = codings[0]
    if coding not in allowed:
        raise Refusal("unsupported_encoding", f"Content-Encoding {coding[:20]} is not allowed on this route")
    decoder = zlib.decompressobj(wbits=31 if coding == "gzip" else 15)
    try:
        decoded = decoder.decompress(body, limit + 1)
    except zlib.error:
        raise Refusal("bad_request", f"the body is not valid {coding}") from None
    if len(decoded) > limit:
        raise Refusal("body_too_large", f"the decoded body exceeds the limit of {limit} bytes", extra={"limit_bytes": limit})
    if not decoder.eof or decoder.unused_data:
        raise Refusal("bad_request", f"the {coding} body is truncated or has trailing data")
    return decoded
