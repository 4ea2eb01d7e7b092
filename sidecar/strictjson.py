"""JSON read strictly: what two parsers could read differently is refused, never guessed at.

Used wherever JSON arrives from outside (a request body at the proxy's door, a document posted to the
admin API): duplicate keys at any depth, keys equal ignoring case in one object, a key with a non-ASCII
letter that folds to ASCII (``ſ`` reads as ``s``), NaN, Infinity, a number too large for a float, an
integer beyond 64 bits, nesting deeper than 128 levels, a lone surrogate (escaped, as raw bytes, or in a
UTF-16/32 document) and bytes that are JSON only once repaired are refused (``Refusal("bad_request")``).
What is accepted is a document orjson, the policy input and the audit chain can all write.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from typing import Any

import orjson

from .problems import Refusal

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_ENCODED_SURROGATE = re.compile(rb"\xed[\xa0-\xbf]")  # U+D800..U+DFFF as UTF-8 would encode them


class NotJson(Exception):
    pass


def strict_json(body: bytes) -> Any:
    """Parse JSON, refusing what two parsers could read differently (raises Refusal), or raise NotJson."""
    try:
        value = json.loads(body, object_pairs_hook=unique_members, parse_constant=_constant, parse_float=_float,
                           parse_int=_int)
    except Ambiguous as exc:
        raise Refusal("bad_request", f"ambiguous JSON body: {exc}") from None
    except RecursionError:
        # Too deep for this parser, not for every upstream's: judged unreadable it could still be read as JSON.
        raise Refusal("bad_request", "malformed JSON body: nested too deeply") from None
    except UnicodeDecodeError:
        if _json_once_repaired(body):
            raise Refusal("bad_request", "ambiguous JSON body: invalid UTF-8 (a parser that replaces it reads JSON)") from None
        raise NotJson() from None
    except ValueError:  # JSONDecodeError
        raise NotJson() from None
    if _may_hold_lone_surrogates(body):
        _refuse_lone_surrogates(value)
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and _deeper_than_allowed(value):
        raise Refusal("bad_request", f"JSON body nested deeper than {MAX_JSON_DEPTH} levels")
    return value


class Ambiguous(Exception):
    pass


def unique_members(pairs: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """An object from its members; equal names, names equal ignoring case, and disguised names are refused."""
    found: dict[str, Any] = {}
    folded: set[str] = set()
    for name, value in pairs:
        if name in found:
            raise Ambiguous(f"duplicate key {name[:60]!r}")
        if not name.isascii() and any(not c.isascii() and c.casefold().isascii() for c in name):
            raise Ambiguous(f"key {name[:60]!r} has a non-ASCII letter that folds to ASCII")
        key = name.casefold()
        if key in folded:
            raise Ambiguous(f"keys equal ignoring case ({name[:60]!r})")
        folded.add(key)
        found[name] = value
    return found


def _constant(name: str) -> Any:
    raise Ambiguous(f"{name} is not JSON")


def _float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise Ambiguous(f"number {text[:40]} is out of range")
    return number


# serde_json's default limit; and the policy input, which orjson writes to at most _ORJSON_DEPTH levels,
# holds a body a few levels down.
MAX_JSON_DEPTH = 128


def _orjson_depth() -> int:
    """The deepest nesting orjson writes (254 in orjson 3), found once rather than assumed."""
    nested: list[Any] = []
    for depth in range(1, 4096):
        try:
            orjson.dumps(nested)
        except TypeError:
            return depth - 1
        nested = [nested]
    raise RuntimeError("orjson writes any nesting: the depth check needs another way")


_ORJSON_DEPTH = _orjson_depth()
if _ORJSON_DEPTH < MAX_JSON_DEPTH + 8:
    raise RuntimeError("orjson cannot write a policy input that holds a body nested MAX_JSON_DEPTH levels")


def _deeper_than_allowed(value: Any) -> bool:
    """Whether ``value`` nests deeper than MAX_JSON_DEPTH, in C: orjson writes it inside enough arrays to
    reach its own limit only if it is no deeper (a walk in Python costs 160 ms for a 1 MiB body)."""
    wrapped = value
    for _ in range(_ORJSON_DEPTH - MAX_JSON_DEPTH):
        wrapped = [wrapped]
    try:
        orjson.dumps(wrapped)
    except TypeError:
        return True
    return False


# Integers a 64-bit field holds, signed or not. Beyond them parsers part ways (Go and serde refuse or round,
# JavaScript rounds, Python keeps every digit, orjson refuses), so the policy and the upstream could read
# two numbers; and one such integer would also make the audit queue hold the parsed tree, not bytes.
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
_INT_DIGITS = len(str(_INT_MIN))


def _int(text: str) -> int:
    number = int(text) if len(text) <= _INT_DIGITS else None  # never convert thousands of digits
    if number is None or not _INT_MIN <= number <= _INT_MAX:
        raise Ambiguous(f"integer {text[:40]} is beyond 64 bits")
    return number


def _may_hold_lone_surrogates(body: bytes) -> bool:
    """Whether parsing may have produced a lone surrogate: escaped (``\\ud800``), encoded in UTF-8 (the bytes
    ED A0 80, which json.loads decodes with surrogatepass), or in a UTF-16/32 body (which json.loads detects)."""
    return bool((b"\\u" in body and _SURROGATE_ESCAPE.search(body)) or _ENCODED_SURROGATE.search(body)
                or json.detect_encoding(body) not in ("utf-8", "utf-8-sig"))


def _json_once_repaired(body: bytes) -> bool:
    """Whether a body that is not UTF-8 is JSON to a parser that replaces what is not (Go's encoding/json)."""
    try:
        json.loads(body.decode("utf-8", "replace"))
    except RecursionError:
        return True
    except ValueError:
        return False
    return True


def _refuse_lone_surrogates(value: Any) -> None:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise Refusal("bad_request", "ambiguous JSON body: a lone UTF-16 surrogate") from None
