"""sidecar.jsoncodec: the fast paths write exactly what the slow ones wrote.

The audit chain's hashes are over the canonical form, and chains written before orjson must verify
after it: a property test checks byte equality with the standard library's form on arbitrary JSON
values, small floats, 65-bit integers and embedded pre-serialised documents included. The engine's
input bytes must be judged as the public binding API judges the same document.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.jsoncodec import JsonDocument, canonical, dumps_sorted, loads

ROOT = Path(__file__).resolve().parent.parent


def stdlib_canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


finite_floats = st.floats(allow_nan=False, allow_infinity=False)
scalars = st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | finite_floats | st.text()
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_canonical_is_byte_for_byte_the_standard_librarys(value: Any) -> None:
    event = {"value": value}
    assert canonical(event) == stdlib_canonical(event)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=8), json_values, max_size=5))
def test_an_embedded_document_is_written_as_if_it_were_serialised_in_place(document: dict[str, Any]) -> None:
    embedded = {"type": "decision", "input": JsonDocument(document)}
    assert canonical(embedded) == stdlib_canonical({"type": "decision", "input": document})


@pytest.mark.parametrize("value, written", [
    (1e-7, b"1e-07"), (0.00001, b"1e-05"), (0.0001, b"0.0001"), (1e16, b"1e+16"), (2**70, b"1180591620717411303424"),
])
def test_the_forms_orjson_writes_differently_fall_back(value: Any, written: bytes) -> None:
    assert canonical({"v": value}) == b'{"v":' + written + b"}"


def test_non_string_keys_and_odd_types_are_written_as_before() -> None:
    import datetime
    import enum

    class Level(enum.IntEnum):
        HIGH = 3

    event = {"keys": {1: "a"}, "level": Level.HIGH, "at": datetime.datetime(2026, 11, 27), "tags": {"x"}}
    assert canonical(event) == stdlib_canonical(event)


def test_dumps_sorted_refuses_what_is_not_json() -> None:
    with pytest.raises(TypeError):
        dumps_sorted({"lone": "\ud800"})
    with pytest.raises(TypeError):
        dumps_sorted({"huge": 2**70})
    assert loads(dumps_sorted({"b": 1, "a": [math.pi]})) == {"a": [math.pi], "b": 1}
    assert dumps_sorted({"b": 1, "a": 2}) == b'{"a":2,"b":1}'


def test_a_json_document_serialises_once() -> None:
    document = JsonDocument({"b": 1, "a": {"z": None, "y": "é"}})
    first = document.json
    assert first == dumps_sorted(dict(document)) == '{"a":{"y":"é","z":null},"b":1}'.encode()
    assert document.json is first


def test_the_engine_judges_the_serialised_input_as_the_public_api_judges_the_document() -> None:
    from sidecar.policy.embedded import _eval_json, new_engine, opa_available
    from sidecar.policy.loader import read_policy_dir

    if not opa_available():
        pytest.skip("opa_bindings is not installed")
    engine = new_engine(read_policy_dir(ROOT / "tests" / "policies" / "fixture"))
    try:
        for method in ("GET", "POST", "DELETE"):
            document = {"request": {"method": method, "path": "/x"}, "tool": {"route": "crm"}, "task": None}
            expected = engine.eval_document("sidecar.authz.decision", document)
            assert _eval_json(engine, "sidecar.authz.decision", dumps_sorted(JsonDocument(document))) == expected
    finally:
        engine.close()
