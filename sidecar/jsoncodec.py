"""JSON on the request path: orjson (C), where the standard library's encoder cost a tenth of a call.

Two serialisations happen on every call. The policy input goes to the engine as sorted, compact JSON
made once (``JsonDocument.json``); the audit log hashes each event's ``canonical`` form, into which
the decision event's input is embedded as those same bytes instead of being serialised again.

The canonical form is the one the audit chain has always used, byte for byte:
``json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)``.
orjson writes the same bytes for every JSON value but two kinds: floats below 1e-4 in magnitude
(orjson ``1e-7`` and ``0.00001``, the standard library ``1e-07`` and ``1e-05``) and what orjson
refuses (integers beyond 64 bits, keys that are not strings). For those ``canonical`` falls back to
the standard library, so chains written before and after this module verify alike. (NaN is written
``null`` by orjson and ``NaN`` by the standard library; no event holds one, as request bodies with
NaN are refused at the door.)
"""

from __future__ import annotations

import json
from typing import Any

import orjson

_SORTED = orjson.OPT_SORT_KEYS
# Subclasses of str, int, float, dict and list reach _default, so that each is written the way the
# standard library writes it (an IntEnum as its number) and a JsonDocument as the bytes it holds.
_CANONICAL = (orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_SUBCLASS | orjson.OPT_PASSTHROUGH_DATETIME
              | orjson.OPT_PASSTHROUGH_DATACLASS)
# Bytes that may be part of a small float, which orjson writes differently; a string that merely
# holds one costs the slower path, never a different hash.
_MAYBE_SMALL_FLOAT = (b"e-", b"0.0000")


class JsonDocument(dict[str, Any]):
    """A JSON object serialised once: ``json`` is its sorted compact form, made on first use and kept.

    It is never changed after it is made (the policy input: read by every step, rewritten by none).
    """

    __slots__ = ("_json",)

    @property
    def json(self) -> bytes:
        try:
            return self._json
        except AttributeError:
            # A copy of exactly its length: orjson's own result keeps the buffer it grew, 5 times the length of
            # a typical policy input and 60 times that of a body of many small values, as long as it is held.
            self._json: bytes = bytes(memoryview(orjson.dumps(self, option=_SORTED)))
            return self._json


class SerialisedJson:
    """A JSON document kept as its sorted compact bytes only (a JsonDocument's ``json``), without the parsed tree.

    What the audit queues hold: a parsed body can take 25 times its serialised size in Python objects
    (a 1 MiB array of empty arrays, ~26 MB), so a queue bounded by bytes holds bytes. ``canonical``
    embeds them as they are; the standard library's encoders read them back (``stdlib_default``).
    """

    __slots__ = ("json",)

    def __init__(self, data: bytes) -> None:
        self.json = data


def stdlib_default(value: Any) -> Any:
    """``default`` for the standard library's ``json.dumps``: a SerialisedJson as the document it holds."""
    if isinstance(value, SerialisedJson):
        return loads(value.json)
    return str(value)


def dumps_sorted(value: Any) -> bytes:
    """Compact JSON with sorted keys; TypeError for what is not JSON (lone surrogates, 65-bit integers)."""
    if isinstance(value, JsonDocument):
        return value.json
    return orjson.dumps(value, option=_SORTED)


def loads(data: bytes | str) -> Any:
    return orjson.loads(data)


def canonical(event: dict[str, Any]) -> bytes:
    """The audit chain's canonical JSON of ``event`` (see the module's docstring)."""
    try:
        body = orjson.dumps(event, option=_CANONICAL, default=_default)
    except TypeError:
        return _canonical_stdlib(event)
    if any(pattern in body for pattern in _MAYBE_SMALL_FLOAT):
        return _canonical_stdlib(event)
    return body


def _default(value: Any) -> Any:
    if isinstance(value, (JsonDocument, SerialisedJson)):
        return orjson.Fragment(value.json)
    # A subclass, written as the standard library writes its base type.
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, list):
        return list(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)


def _canonical_stdlib(event: dict[str, Any]) -> bytes:
    return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=stdlib_default).encode()
