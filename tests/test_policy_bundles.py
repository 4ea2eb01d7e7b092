"""Issue 19, OPA bundles: `policy build` writes one (signed or not) that the REST engine's OPA server reads
too; the embedded engine loads a bundle from a file or a URL (ETag), verifies its signature, refuses a
bundle unsigned or signed by another key or changed since signing, and one whose roots do not hold its
data, while the last good policy keeps deciding."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from approvals_support import audit_events, eventually
from harness import FIXTURE_POLICY, ROOT, EchoTool, OpaDataApiServer, RunningSidecar, sidecar_config, start_sidecar
from sidecar.app import probe_input
from sidecar.cli import main
from sidecar.policy.bundle import build_bundle, read_bundle
from sidecar.policy.embedded import EmbeddedEngine
from sidecar.policy.loader import PolicyLoadError
from sidecar.policy.rest import RestEngine

READ_REASON = "fixture: reads are allowed"


def key_pair(tmp: Path, name: str, kind: str = "ec") -> tuple[Path, Path]:
    key: Any = ec.generate_private_key(ec.SECP256R1()) if kind == "ec" else rsa.generate_private_key(65537, 2048)
    private = tmp / f"{name}.pem"
    public = tmp / f"{name}.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def policy_version(tmp: Path, tag: str) -> Path:
    """The fixture policy with its read reason tagged."""
    directory = tmp / f"policy-{tag}"
    module = directory / "sidecar" / "authz" / "fixture.rego"
    module.parent.mkdir(parents=True)
    source = (FIXTURE_POLICY / "sidecar" / "authz" / "fixture.rego").read_text()
    module.write_text(source.replace(f'"{READ_REASON}"', f'"{READ_REASON} ({tag})"'))
    return directory


def publish(target: Path, content: bytes) -> None:
    staging = target.with_name(f".{target.name}.tmp")
    staging.write_bytes(content)
    os.replace(staging, target)  # atomically, as a CI job's upload or a volume update


def tarball(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as archive:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return out.getvalue()


def members(content: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(content), mode="r:gz") as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}  # type: ignore[union-attr]


# ---------------------------------------------------------------- policy build, read by the REST engine's server


def test_policy_build_writes_an_opa_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    private, public = key_pair(tmp_path, "ci")
    out = tmp_path / "bundle.tar.gz"
    assert main(["policy", "build", str(ROOT / "rego"), "-o", str(out), "--revision", "git-4f2a9c1",
                 "--signing-key", str(private), "--key-id", "ci"]) == 0
    assert "revision git-4f2a9c1, signed (key id ci)" in capsys.readouterr().out
    files = members(out.read_bytes())
    assert json.loads(files["/.manifest"]) == {"revision": "git-4f2a9c1", "roots": ["sidecar"], "rego_version": 1}
    assert "/sidecar/authz/decision.rego" in files and "/data.json" in files
    assert json.loads(files["/data.json"]) == json.loads((ROOT / "rego" / "data.json").read_text())
    signatures = json.loads(files["/.signatures.json"])["signatures"]
    assert len(signatures) == 1 and signatures[0].count(".") == 2  # one compact JWS, as OPA writes it
    read = read_bundle(out.read_bytes(), origin=out, public_key=public.read_bytes(), key_id="ci")
    assert read.revision == "git-4f2a9c1" and read.signed_by == "ci" and read.roots == ("sidecar",)
    # Re-formatting data.json keeps its signature valid: JSON files are hashed in canonical form, as by OPA.
    files["/data.json"] = json.dumps(json.loads(files["/data.json"]), indent=8).encode()
    assert read_bundle(tarball(files), origin="reformatted", public_key=public.read_bytes()).revision == "git-4f2a9c1"
    # The same tree and revision always give the same bytes (a CI job can compare).
    assert build_bundle(ROOT / "rego", revision="r") == build_bundle(ROOT / "rego", revision="r")


async def test_a_built_bundle_is_served_by_the_rest_engines_opa_server_with_its_revision(
        tmp_path: Path, make_sidecar: Any, echo_tool: EchoTool) -> None:
    out = tmp_path / "bundle.tar.gz"
    assert main(["policy", "build", str(FIXTURE_POLICY), "-o", str(out), "--revision", "rev-42"]) == 0
    server = OpaDataApiServer(bundle=out)  # as `opa run --server --bundle bundle.tar.gz`
    await server.start()
    embedded = EmbeddedEngine(FIXTURE_POLICY)
    rest = RestEngine(server.url, timeout_seconds=5)
    try:
        evaluation = await rest.evaluate_with_provenance("sidecar/authz/decision", probe_input())
        assert evaluation.bundles == {"authz": "rev-42"}
        assert evaluation.result == await embedded.evaluate("sidecar/authz/decision", probe_input())
        sc = await make_sidecar(engine="rest", rest_url=server.url)
        async with httpx.AsyncClient() as agent:
            assert (await agent.get(f"{sc.proxy}/crm/customers/1")).status_code == 200

        async def decision() -> dict[str, Any] | None:
            return next((e for e in audit_events(sc.audit_path) if e.get("type") == "decision"), None)

        assert (await eventually(decision, what="the decision event"))["bundles"] == {"authz": {"revision": "rev-42"}}
    finally:
        await rest.close()
        await embedded.close()
        await server.stop()


# ---------------------------------------------------------------- the embedded engine on a bundle file


async def policy_state(sc: RunningSidecar) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        state: dict[str, Any] = (await client.get(f"{sc.admin}/v1/policy")).json()
    return state


async def refused_since(sc: RunningSidecar, count: int) -> dict[str, Any]:
    """Wait for the count-th refused reload in the audit chain; return it."""
    async def probe() -> dict[str, Any] | None:
        refusals = [e for e in audit_events(sc.audit_path) if e.get("type") == "policy.reload" and e["result"] == "refused"]
        return refusals[count - 1] if len(refusals) >= count else None

    return await eventually(probe, what=f"refused reload #{count}")


async def still_deciding(sc: RunningSidecar, revision: str, reason: str) -> None:
    async with httpx.AsyncClient() as agent:
        assert (await agent.get(f"{sc.proxy}/crm/customers/1")).status_code == 200

    async def decided() -> dict[str, Any] | None:
        events = [e for e in audit_events(sc.audit_path) if e.get("type") == "decision"]
        return events[-1] if events and events[-1]["bundles"]["authz"]["revision"] == revision else None

    last = await eventually(decided, what=f"a decision by {revision}")
    assert last["reasons"] == [reason]


@pytest.fixture
async def bundle_sidecar(tmp_path: Path, echo_tool: EchoTool) -> AsyncIterator[Any]:
    started: list[RunningSidecar] = []

    async def start(bundle: str, public_key: Path | None = None) -> RunningSidecar:
        config = sidecar_config(tmp_path, echo_tool.base)
        config["policy"].update({"bundle": bundle, "reload_seconds": 0.1})
        if public_key is not None:
            config["policy"]["bundle_public_key"] = str(public_key)
        sc = await start_sidecar(tmp_path, config)
        started.append(sc)
        return sc

    yield start
    for sc in started:
        await sc.sidecar.stop()


async def test_a_signed_bundle_loads_and_bad_signatures_unsigned_and_tampered_bundles_are_refused(
        tmp_path: Path, bundle_sidecar: Any) -> None:
    private, public = key_pair(tmp_path, "policy-ci")
    other, _ = key_pair(tmp_path, "someone-else", kind="rsa")
    target = tmp_path / "live.tar.gz"
    publish(target, build_bundle(policy_version(tmp_path, "v1"), revision="v1", signing_key=private.read_bytes()))
    sc = await bundle_sidecar(str(target), public)
    assert (await policy_state(sc))["revision"] == "v1"
    await still_deciding(sc, "v1", f"{READ_REASON} (v1)")

    v2 = policy_version(tmp_path, "v2")
    cases = [
        ("signed by another key", build_bundle(v2, revision="v2-other-key", signing_key=other.read_bytes()),
         "signature not valid for the configured key"),
        ("unsigned", build_bundle(v2, revision="v2-unsigned"), "not signed"),
    ]
    tampered = members(build_bundle(v2, revision="v2-tampered", signing_key=private.read_bytes()))
    tampered["/sidecar/authz/fixture.rego"] = tampered["/sidecar/authz/fixture.rego"].replace(b"(v2)", b"(evil)")
    cases.append(("changed after signing", tarball(tampered), "fixture.rego: digest mismatch"))
    extra = members(build_bundle(v2, revision="v2-extra", signing_key=private.read_bytes()))
    extra["/sidecar/authz/backdoor.rego"] = b"package sidecar.authz\n"
    cases.append(("a file added after signing", tarball(extra), "backdoor.rego: not included in the bundle signature"))

    for count, (what, content, message) in enumerate(cases, start=1):
        publish(target, content)
        refusal = await refused_since(sc, count)
        assert message in refusal["error"], (what, refusal["error"])
        assert refusal["active_revision"] == "v1"
        await still_deciding(sc, "v1", f"{READ_REASON} (v1)")

    async with httpx.AsyncClient() as client:
        report = (await client.get(f"{sc.metrics}/readyz")).json()
    assert report["ready"] is True and report["warnings"] == ["policy_reload"]

    publish(target, build_bundle(v2, revision="v2", signing_key=private.read_bytes()))

    async def loaded() -> bool:
        return bool((await policy_state(sc))["revision"] == "v2")

    await eventually(loaded, what="the validly signed v2")
    await still_deciding(sc, "v2", f"{READ_REASON} (v2)")


async def test_a_bundle_whose_roots_do_not_hold_its_data_is_refused(tmp_path: Path, bundle_sidecar: Any,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # policy build refuses to write one
    library = tmp_path / "library"
    library.mkdir()
    (library / "sidecar").symlink_to(ROOT / "rego" / "sidecar", target_is_directory=True)
    (library / "data.json").write_text((ROOT / "rego" / "data.json").read_text())
    assert main(["policy", "build", str(library), "-o", str(tmp_path / "x.tar.gz"), "--revision", "x",
                 "--root", "sidecar/authz", "--root", "sidecar/authz_test"]) == 1
    assert "do not permit data at path '/sidecar/config'" in capsys.readouterr().err

    target = tmp_path / "live.tar.gz"
    publish(target, build_bundle(policy_version(tmp_path, "v1"), revision="v1"))
    sc = await bundle_sidecar(str(target))
    good = members(build_bundle(policy_version(tmp_path, "v2"), revision="v2"))
    cases = [
        # the data lies outside the roots the manifest claims
        ({"revision": "data-outside", "roots": ["sidecar/authz"]},
         {"sidecar": {"config": {"limits": {"per_call_amount": 1}}}}, "do not permit data at path '/sidecar/config'"),
        # roots that overlap one another
        ({"revision": "overlapping", "roots": ["sidecar", "sidecar/authz"]}, {}, "overlapped roots"),
        # a module outside the roots
        ({"revision": "module-outside", "roots": ["other"]}, {}, "do not permit package 'sidecar.authz'"),
        # data the sidecar sets itself
        ({"revision": "runtime", "roots": ["sidecar"]}, {"sidecar": {"runtime": {"config_checked": True}}},
         "data.sidecar.runtime is set by the sidecar"),
    ]
    for count, (manifest, data, message) in enumerate(cases, start=1):
        files = {**good, "/.manifest": json.dumps(manifest).encode(), "/data.json": json.dumps(data).encode()}
        publish(target, tarball(files))
        refusal = await refused_since(sc, count)
        assert message in refusal["error"], (manifest, refusal["error"])
        assert refusal["revision"] is None or refusal["active_revision"] == "v1"
        await still_deciding(sc, "v1", f"{READ_REASON} (v1)")


def test_reading_refuses_what_is_not_a_plain_bundle(tmp_path: Path) -> None:
    with pytest.raises(PolicyLoadError, match="not a gzipped tar bundle"):
        read_bundle(b"not a tarball", origin="x")
    with pytest.raises(PolicyLoadError, match="not a plain file"):
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w:gz") as archive:
            link = tarfile.TarInfo("/sidecar/authz/x.rego")
            link.type = tarfile.SYMTYPE
            link.linkname = "/etc/passwd"
            archive.addfile(link)
        read_bundle(out.getvalue(), origin="x")
    private, _ = key_pair(tmp_path, "k")
    signed = build_bundle(FIXTURE_POLICY, revision="r", signing_key=private.read_bytes())
    with pytest.raises(PolicyLoadError, match="no policy.bundle_public_key"):
        read_bundle(signed, origin="x")  # a signature nobody checks is refused, as by OPA


# ---------------------------------------------------------------- a bundle over HTTP, polled with ETag


async def test_a_bundle_url_is_polled_with_if_none_match(tmp_path: Path, bundle_sidecar: Any) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    served = {"content": build_bundle(policy_version(tmp_path, "v1"), revision="v1"), "etag": '"v1"'}
    seen: list[str | None] = []

    class BundleServer(BaseHTTPRequestHandler):
        """On its own thread: the sidecar reads its first bundle while it starts, before its event loop runs."""

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            seen.append(self.headers.get("If-None-Match"))
            etag, content = str(served["etag"]), served["content"]
            assert isinstance(content, bytes)
            if self.headers.get("If-None-Match") == etag:
                self.send_response(304)
                self.send_header("ETag", etag)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("ETag", etag)
            self.send_header("Content-Type", "application/gzip")
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), BundleServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        sc = await bundle_sidecar(f"http://127.0.0.1:{server.server_address[1]}/bundles/authz.tar.gz")
        assert (await policy_state(sc))["revision"] == "v1"

        async def conditional() -> bool:
            return '"v1"' in seen

        await eventually(conditional, what="a conditional poll")  # answered 304: nothing fetched, nothing rebuilt
        served.update(content=build_bundle(policy_version(tmp_path, "v2"), revision="v2"), etag='"v2"')

        async def loaded() -> bool:
            return bool((await policy_state(sc))["revision"] == "v2")

        await eventually(loaded, what="v2 from the bundle server")
        await still_deciding(sc, "v2", f"{READ_REASON} (v2)")
        reloads = [e for e in audit_events(sc.audit_path) if e.get("type") == "policy.reload"]
        assert [(e["result"], e["revision"]) for e in reloads] == [("loaded", "v2")]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("policy, message", [
    ({"engine": "rest", "bundle": "https://bundles.example.com/authz.tar.gz"}, "policy.bundle: is for the embedded engine"),
    ({"bundle": "missing.tar.gz"}, "policy.bundle: no such file"),
    ({"bundle": "ftp://bundles.example.com/authz.tar.gz"}, "policy.bundle: not an http(s) URL"),
    ({"bundle_public_key": "public.pem"}, "policy.bundle_public_key: needs policy.bundle"),
    ({"reload_seconds": 0.01}, "policy.reload_seconds: must be 0 (no polling) or between 0.1 and 3600"),
    ({"bundle_name": "a/b"}, "policy.bundle_name"),
    ({"shadow": "nowhere"}, "policy.shadow: no such directory or bundle file"),
])
def test_policy_lifecycle_settings_are_checked(tmp_path: Path, policy: dict[str, Any], message: str) -> None:
    from sidecar.config import ConfigError, parse_config

    (tmp_path / "public.pem").write_text("not checked here")
    config = sidecar_config(tmp_path, "http://127.0.0.1:9")
    config["policy"].update(policy)
    with pytest.raises(ConfigError, match=re_escape(message)):
        parse_config(config, tmp_path / "sidecar.yaml")


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_json_files_hash_as_opa_hashes_them() -> None:
    """OPA (bundle/hash.go) hashes a data.json or .manifest as its compact JSON with keys sorted, numbers as
    written, HTML characters and non-ASCII text unescaped; a .rego file as its bytes."""
    import hashlib

    from sidecar.policy.bundle import file_hash

    written = ('{"key2": {"c": 123.45678911111111111111111111111111111111111111111111111, "b": 1, "a": 0},\n'
               ' "key1": ["element1", "element2"], "html": "<foo></foo>", "text": ["$", "α", "©", "™"], "n": null}')
    compact = ('{"html":"<foo></foo>","key1":["element1","element2"],'
               '"key2":{"a":0,"b":1,"c":123.45678911111111111111111111111111111111111111111111111},'
               '"n":null,"text":["$","α","©","™"]}')
    assert file_hash("data.json", written.encode()) == hashlib.sha256(compact.encode()).hexdigest()
    assert file_hash("a/b/data.json", written.encode()) == file_hash("data.json", compact.encode())
    assert file_hash("x.rego", b"package x\n") == hashlib.sha256(b"package x\n").hexdigest()
    assert file_hash(".manifest", b'{"roots": ["sidecar"], "revision": "r"}') == \
        hashlib.sha256(b'{"revision":"r","roots":["sidecar"]}').hexdigest()
