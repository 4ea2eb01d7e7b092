"""The request-target, parsed once and strictly into the one form that is judged, bound, recorded and sent.

The threat model is an agent that controls every byte it sends, and upstreams that
read those bytes as ordinary servers do: they decode ``%XX``, strip ``;`` parameters,
resolve dot segments. So the target is normalised once, before the decision, as
RFC 3986 section 6.2.2 allows, and whatever could still be read two ways is refused:

- an escape of an unreserved character is decoded (``/crm/r%65funds`` is ``/crm/refunds``);
  every other escape is kept, its hex upper-cased (``%2c`` becomes ``%2C``);
- refused (``bad_request``): a fragment; a raw character outside the path's (or the
  query's) allowed set, ``;`` included; a ``%`` not followed by two hex digits; in the
  path, an escaped ``/``, ``\\``, ``%``, ``;`` or control character; in the query, an
  escaped control character; after decoding, a dot segment or an empty segment;
- ``_method`` in the query (a method override some frameworks honour) is refused as
  ``method_override``.

The canonical path and query are what the upstream receives, byte for byte: the
forwarder sends them without re-quoting. docs/security.md has the table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl

from ..problems import Refusal

UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_CONTROLS = frozenset(range(0x00, 0x20)) | {0x7F}
# Escapes that would let the upstream see another path than the policy: a separator,
# a second decoding, a matrix parameter, a control character.
_PATH_REFUSED_ESCAPES = _CONTROLS | {0x2F, 0x5C, 0x25, 0x3B}
_QUERY_REFUSED_ESCAPES = _CONTROLS

# pchar without ";" (RFC 3986 section 3.3), plus "%" for escapes checked below.
PATH_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,=:@/%]*")
QUERY_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,=:@/?%]*")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_HOST = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-.]+)$")
_ABSOLUTE = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+\-.]*)://(?P<authority>[^/?]*)(?P<rest>.*)$", re.DOTALL)
_PORT = re.compile(r"[0-9]{1,5}")
_METHOD_OVERRIDE_PARAM = "_method"


@dataclass(frozen=True)
class Target:
    """A request-target in canonical form. ``host`` and ``port`` only for the absolute form."""

    path: str
    query: str  # without the "?"; empty when there is none
    host: str | None = None
    port: int | None = None
    scheme: str | None = None

    @property
    def path_and_query(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path


def _bad(detail: str) -> Refusal:
    return Refusal("bad_request", detail)


def _normalise_escapes(text: str, refused: frozenset[int], where: str) -> str:
    if "%" not in text:
        return text
    if _BAD_ESCAPE.search(text):
        raise _bad(f"invalid percent-escape in the {where}")

    def one(match: re.Match[str]) -> str:
        value = int(match.group(1), 16)
        if value in refused:
            raise _bad(f"escaped character %{value:02X} is not allowed in the {where}")
        char = chr(value)
        return char if char in UNRESERVED else "%" + match.group(1).upper()

    return _ESCAPE.sub(one, text)


def canonical_path(raw: str) -> str:
    if not raw.startswith("/"):
        raise _bad("the path must start with /")
    if not PATH_CHARS.fullmatch(raw):
        raise _bad("character not allowed in the path (fragments, ';', spaces, quotes and non-ASCII are refused)")
    path = _normalise_escapes(raw, _PATH_REFUSED_ESCAPES, "path")
    if "//" in path:
        raise _bad("empty path segment")
    if any(segment in (".", "..") for segment in path.split("/")):
        raise _bad("dot segment in the path")
    return path


def canonical_query(raw: str) -> str:
    if not raw:
        return ""
    if not QUERY_CHARS.fullmatch(raw):
        raise _bad("character not allowed in the query (fragments, ';', spaces, quotes and non-ASCII are refused)")
    query = _normalise_escapes(raw, _QUERY_REFUSED_ESCAPES, "query")
    if any(name == _METHOD_OVERRIDE_PARAM for name, _ in query_pairs(query)):
        raise Refusal("method_override", "the _method query parameter would change the method after the decision")
    return query


def query_pairs(query: str) -> list[tuple[str, str]]:
    """The query as the policy and most servers read it: ``&``-separated, ``+`` as space, escapes decoded."""
    try:
        return parse_qsl(query, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise _bad("a query escape is not UTF-8") from None


def query_mapping(query: str) -> dict[str, list[str]]:
    mapping: dict[str, list[str]] = {}
    for name, value in query_pairs(query):
        mapping.setdefault(name, []).append(value)
    return mapping


def origin_form(raw: str) -> Target:
    """``/path?query`` as the agent sent it; refused if ambiguous."""
    path, _, query = raw.partition("?")
    return Target(canonical_path(path), canonical_query(query))


def absolute_form(raw: str) -> Target:
    """``http://host[:port]/path?query`` (forward-proxy mode)."""
    found = _ABSOLUTE.match(raw)
    if found is None or found["scheme"].lower() not in ("http", "https"):
        raise _bad("an absolute request-target must be http:// or https://")
    scheme = found["scheme"].lower()
    host, port = authority(found["authority"], 443 if scheme == "https" else 80)
    rest = found["rest"] or "/"
    if rest.startswith("?"):
        rest = "/" + rest
    path, _, query = rest.partition("?")
    return Target(canonical_path(path), canonical_query(query), host=host, port=port, scheme=scheme)


def authority(text: str, default_port: int) -> tuple[str, int]:
    """``host[:port]``, lower-cased; user info and anything else is refused."""
    if "@" in text:
        raise _bad("user info in the request-target is not allowed")
    host, port = text, default_port
    if text.startswith("["):
        end = text.find("]")
        host, after = text[: end + 1], text[end + 1:]
        if after:
            if not after.startswith(":"):
                raise _bad("malformed authority")
            port = _port(after[1:])
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
        port = _port(port_text)
    if not host or not _HOST.match(host):
        raise _bad("malformed host in the request-target")
    return host.lower().rstrip("."), port


def _port(text: str) -> int:
    if not _PORT.fullmatch(text) or not 0 < int(text) < 65536:
        raise _bad("malformed port in the request-target")
    return int(text)
