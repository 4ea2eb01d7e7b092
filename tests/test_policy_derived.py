"""What data alone decides is worked out once at load (data.sidecar.runtime.derived) on every embedded load.

The shipped library's ``derived`` document (rego/sidecar/authz/derived.rego) is evaluated once when an
embedded engine loads the policy, after the data check, and set beside ``config_checked`` in the pool's
engine; a live reload sets it afresh from the new data. The Rego tests (derived_test.rego) check that
a decision is the same with it and without it; the decision vectors and bench.policy_differential check it
through both engines.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from sidecar.policy.embedded import EmbeddedEngine, _LoadTimeDocuments, new_engine, opa_available, set_runtime_data
from sidecar.policy.loader import PolicyLoadError, read_policy_dir

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not opa_available(), reason="opa_bindings is not installed")

GET_CRM = {
    "version": "v2",
    "request": {"method": "GET", "path": "/customers/42", "host": "crm.internal"},
    "tool": {"route": "crm", "labels": {"data_classification": "confidential"}},
    "agent": {"id": "a"},
}


def derived_of(directory: Path) -> Any:
    bare = new_engine(read_policy_dir(directory))
    try:
        return bare.eval_document("sidecar.authz.derived")
    finally:
        bare.close()


def test_the_engine_of_a_pool_gets_the_derived_document_beside_config_checked() -> None:
    pool = EmbeddedEngine(ROOT / "rego", workers=2, spare_engines=1)
    try:
        expected = {"config_checked": True, "derived": derived_of(ROOT / "rego")}
        assert expected["derived"]["ttl_seconds"] == {"low": 300, "medium": 120, "high": 30, "critical": 10}
        assert pool._engine.eval_document("sidecar.runtime") == expected
    finally:
        pool.close_now()


def test_a_policy_without_a_data_check_or_whose_derived_fails_gets_none(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "tests" / "policies" / "fixture", tmp_path / "fixture")
    pool = EmbeddedEngine(tmp_path / "fixture")
    try:
        with pytest.raises(Exception, match="undefined"):
            pool._engine.eval_document("sidecar.runtime")
    finally:
        pool.close_now()
    broken = tmp_path / "broken"
    shutil.copytree(ROOT / "rego", broken)
    (broken / "sidecar" / "authz" / "zz_derived_broken.rego").write_text(
        "package sidecar.authz\n\nderived.broken := to_number(\"not a number\")\n")
    pool = EmbeddedEngine(broken)
    try:
        assert pool._engine.eval_document("sidecar.runtime") == {"config_checked": True}
        assert pool.evaluate_sync("sidecar/authz/decision", GET_CRM)["credential"]["ttl_seconds"] == 300
    finally:
        pool.close_now()


async def test_a_live_reload_sets_the_derived_document_of_the_new_data(tmp_path: Path) -> None:
    from sidecar.policy.live import LivePolicy
    from sidecar.policy.source import DirectorySource

    policy = tmp_path / "rego"
    shutil.copytree(ROOT / "rego", policy)
    live = LivePolicy(DirectorySource(policy), run_policy_tests=False)
    try:
        assert (await live.evaluate("sidecar/authz/decision", GET_CRM))["credential"]["ttl_seconds"] == 300
        data = json.loads((policy / "data.json").read_text())
        data["sidecar"]["config"]["ttl_seconds"]["low"] = 200
        data["sidecar"]["config"]["audiences"] = {"crm": "https://crm.example.com"}
        (policy / "data.json").write_text(json.dumps(data))
        assert (await live.reload(force=True)).result == "loaded"
        runtime = live._current.engine._engine.eval_document("sidecar.runtime")
        assert runtime == {"config_checked": True, "derived": derived_of(policy)}
        assert runtime["derived"]["ttl_seconds"]["low"] == 200
        credential = (await live.evaluate("sidecar/authz/decision", GET_CRM))["credential"]
        assert credential == {"audience": "https://crm.example.com", "scopes": ["crm:read"], "ttl_seconds": 200}
    finally:
        await live.close()


def test_a_policy_that_defines_anything_under_sidecar_runtime_is_refused_at_load() -> None:
    """A module in package sidecar.runtime.* would merge with what the sidecar computes (here: every route
    opened to one agent); the runtime document is the sidecar's alone."""
    from sidecar.policy.loader import PolicyLoadError

    policy = read_policy_dir(ROOT / "rego")
    policy.modules["extra.rego"] = 'package sidecar.runtime.derived\n\nagent_routes["agent-x"] := {"*": true}\n'
    with pytest.raises(PolicyLoadError, match="data.sidecar.runtime is set by the sidecar, not by a policy"):
        EmbeddedEngine(policy)


def test_a_bundle_data_directory_named_with_a_dot_is_refused() -> None:
    """The engine reads '.' in a data path as a separator: sidecar/runtime.derived/data.json would land at
    data.sidecar.runtime.derived although the bundle's own check saw a key named 'runtime.derived'."""
    import io
    import tarfile

    from sidecar.policy.bundle import read_bundle
    from sidecar.policy.loader import PolicyLoadError

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as archive:
        for name, content in {"/.manifest": b'{"revision": "r1", "roots": ["sidecar"]}',
                              "/sidecar/authz/decision.rego": b"package sidecar.authz\n\ndecision := {}\n",
                              "/sidecar/runtime.derived/data.json": b'{"agent_routes": {"a": {"*": true}}}'}.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    with pytest.raises(PolicyLoadError, match="a data directory's name holds '.'"):
        read_bundle(out.getvalue(), origin="hostile.tar.gz", verify=False)


@pytest.mark.parametrize(("package", "refused"), [("sidecar.runtime", True), ("sidecar.runtime.derived", True),
                                                  ("sidecar.runtimes", False), ("sidecar.authz", False)])
def test_the_loader_refuses_a_module_in_the_sidecars_runtime_package(tmp_path: Path, package: str, refused: bool) -> None:
    """Read for the embedded engine or bundled for an OPA server alike (policy build reads the same way)."""
    from sidecar.policy.loader import PolicyLoadError

    (tmp_path / "p.rego").write_text(f"package {package}\n\nx := 1\n")
    if refused:
        with pytest.raises(PolicyLoadError, match=f"package {package}: data.sidecar.runtime is set by the sidecar"):
            read_policy_dir(tmp_path)
    else:
        assert read_policy_dir(tmp_path).modules


@pytest.mark.parametrize("broken", [False, True], ids=["one evaluation", "a document that raises"])
def test_the_documents_read_at_load_are_what_each_evaluation_alone_gives(tmp_path: Path, broken: bool) -> None:
    """Read together in one evaluation (one compiled copy of the policy) or, when one of them raises,
    each on its own: either way each document reads as ``eval_document`` gives it, undefined and
    errors included."""
    import opa_bindings

    policy = tmp_path / "rego"
    shutil.copytree(ROOT / "rego", policy)
    if broken:
        (policy / "sidecar" / "authz" / "zz_derived_broken.rego").write_text(
            "package sidecar.authz\n\nderived.broken := to_number(\"not a number\")\n")
    paths = ("sidecar.runtime", "sidecar.authz.config_errors", "sidecar.authz.derived")
    engine = new_engine(read_policy_dir(policy))
    try:
        documents = _LoadTimeDocuments(engine, paths)
        assert (documents._found is None) is broken
        assert documents.read("sidecar.authz.config_errors") == engine.eval_document("sidecar.authz.config_errors") == []
        with pytest.raises(opa_bindings.OpaUndefinedError):
            documents.read("sidecar.runtime")
        if broken:
            with pytest.raises(opa_bindings.OpaError, match="not a number"):
                documents.read("sidecar.authz.derived")
        else:
            assert documents.read("sidecar.authz.derived") == derived_of(ROOT / "rego")
    finally:
        engine.close()


@pytest.mark.parametrize("check", ["fails", "absent"])
def test_derived_is_not_evaluated_unless_the_data_check_passed(tmp_path: Path, check: str) -> None:
    """``derived`` is worked out only after the data check passed (derive_once): a knob the check refuses
    may make it fail or run for ever (``numbers.range`` over a bad limit: gigabytes at load), and a
    policy without a check never gets it set. Read together with the other load-time documents, it
    must still not be evaluated before the check has passed. A print in its body shows whether it ran."""
    import opa_bindings

    policy = tmp_path / "policy"
    policy.mkdir()
    check_rule = 'config_errors contains "limits.batch: must be at most 1000"\n' if check == "fails" else ""
    (policy / "p.rego").write_text(
        'package sidecar.authz\n\nimport rego.v1\n\n'
        'decision := {"allow": false, "reasons": ["fixture"], "risk": "low"}\n\n' + check_rule +
        'derived := {"evaluated": true} if {\n\tprint("derived evaluated")\n}\n')
    bundle = read_policy_dir(policy)
    engine = new_engine(bundle)
    printed: list[str] = []
    engine.print_handler = lambda message, location: printed.append(message)
    try:
        if check == "fails":
            with pytest.raises(PolicyLoadError, match="limits.batch: must be at most 1000"):
                set_runtime_data(engine, bundle, "sidecar/authz/decision")
        else:
            set_runtime_data(engine, bundle, "sidecar/authz/decision")
            with pytest.raises(opa_bindings.OpaUndefinedError):
                engine.eval_document("sidecar.runtime")
    finally:
        engine.close()
    assert printed == []


def test_a_policy_whose_decision_cannot_be_prepared_with_the_runtime_data_is_refused_at_load(tmp_path: Path) -> None:
    """A rule under data.sidecar.runtime that is undefined at load passes the check that the policy sets
    nothing there, and then conflicts with the data the sidecar sets: the decision cannot be compiled.
    Loaded, every call would be refused (and compiled again); it is refused at load instead, so a reload
    keeps the policy that works."""
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "a.rego").write_text('package sidecar.authz\n\nimport rego.v1\n\nconfig_errors := []\n\n'
                                   'decision := {"allow": false, "reasons": ["fixture"], "risk": "low"}\n')
    (policy / "b.rego").write_text('package sidecar\n\nimport rego.v1\n\nruntime := {"derived": {}} if input.x\n')
    with pytest.raises(PolicyLoadError, match="cannot be prepared: .*conflicting rule"):
        EmbeddedEngine(policy)
