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


def _engine_with(modules: dict[str, str]) -> Any:
    import opa_bindings

    engine = opa_bindings.OpaEngine()
    engine.print_handler = lambda message, location: None
    for name, source in modules.items():
        engine.add_policy(name, source)
    return engine


def test_the_shipped_library_judges_the_serialised_input_as_the_public_api_judges_the_document() -> None:
    from sidecar.policy.embedded import EmbeddedEngine, _eval_json, opa_available

    if not opa_available():
        pytest.skip("opa_bindings is not installed")
    base = {"version": "v2", "request": {"method": "GET", "path": "/crm/customers/42", "host": "crm.svc"},
            "tool": {"route": "crm", "labels": {"data_classification": "confidential"}},
            "agent": {"id": "a"}, "time": {"now_ns": 1795784462347076082}}
    documents = [
        base,
        {**base, "request": {**base["request"], "method": "DELETE"}},
        {**base, "request": {**base["request"], "method": "POST", "body": {"amount": 7e-7, "records": 10**18}}},
        {**base, "task": {"id": "t-" + "9" * 40, "history": {"calls": 10**18}}},
        {**base, "version": "v1"},
        {},
    ]
    pool = EmbeddedEngine(ROOT / "rego")
    try:
        engine = pool._engine
        for document in documents:
            expected = engine.eval_document("sidecar.authz.decision", document)
            assert _eval_json(engine, "sidecar.authz.decision", dumps_sorted(JsonDocument(document))) == expected
    finally:
        pool.close_now()


def test_the_engine_answer_keeps_the_standard_librarys_numbers_and_errors() -> None:
    import opa_bindings

    from sidecar.policy.embedded import _eval_json, opa_available

    if not opa_available():
        pytest.skip("opa_bindings is not installed")
    engine = _engine_with({"t.rego": "package t\n\necho := input.v\n\nhalf := input.n / input.d\n\nnone if false\n"})
    try:
        for raw, value in [(b'{"v": 123456789012345678901234567890}', 123456789012345678901234567890),
                           (b'{"v": -9223372036854775809}', -9223372036854775809),
                           (b'{"v": 18446744073709551615}', 18446744073709551615),
                           (b'{"v": [1e-7, 0.1, 2.5e300, -0.0, 9007199254740993]}', None),
                           (b'{"v": "\\u00e9 \\ud83d\\ude00"}', "\u00e9 \U0001f600")]:
            public = engine.eval_document("t.echo", json.loads(raw))
            got = _eval_json(engine, "t.echo", raw)
            assert got == public and type(got) is type(public)
            assert value is None or (got == value and type(got) is type(value))
        with pytest.raises(opa_bindings.OpaUndefinedError) as undefined:
            _eval_json(engine, "t.none", b"{}")
        with pytest.raises(opa_bindings.OpaUndefinedError) as public_undefined:
            engine.eval_document("t.none", {})
        assert str(undefined.value) == str(public_undefined.value)
        with pytest.raises(opa_bindings.OpaError) as failed:
            _eval_json(engine, "t.half", b'{"n": 1, "d": 0}')
        with pytest.raises(opa_bindings.OpaError) as public_failed:
            engine.eval_document("t.half", {"n": 1, "d": 0})
        assert (failed.value.code, failed.value.message) == (public_failed.value.code, public_failed.value.message)
    finally:
        engine.close()
    with pytest.raises(opa_bindings.OpaError) as closed:
        _eval_json(engine, "t.echo", b"{}")
    assert closed.value.code == "closed"


@settings(max_examples=300, deadline=None)
@given(st.recursive(scalars, lambda children: st.lists(children, max_size=4)
                    | st.dictionaries(st.text(max_size=5), children, max_size=4), max_leaves=20))
def test_an_answer_is_parsed_as_the_standard_library_parses_it(value: Any) -> None:
    from sidecar.policy.embedded import _parse_envelope

    raw = json.dumps({"result": [{"expressions": [{"value": value}]}]}).encode()
    parsed = _parse_envelope(raw)
    assert parsed == json.loads(raw)
    assert json.dumps(parsed, sort_keys=True) == json.dumps(json.loads(raw), sort_keys=True)


def test_an_answer_orjson_refuses_is_parsed_by_the_standard_library() -> None:
    from sidecar.policy.embedded import _parse_envelope

    assert _parse_envelope(b'{"result": [1e400]}') == {"result": [math.inf]}
    assert _parse_envelope(b'{"result": ["\\ud800"]}') == {"result": ["\ud800"]}


def test_an_engine_without_the_binding_internals_is_asked_through_its_public_api() -> None:
    from sidecar.policy.embedded import _eval_json

    class Public:
        def eval_document(self, path: str, input: Any = None) -> Any:
            return {"path": path, "input": input}

    assert _eval_json(Public(), "a.b", b'{"x": [1, 2]}') == {"path": "a.b", "input": {"x": [1, 2]}}
