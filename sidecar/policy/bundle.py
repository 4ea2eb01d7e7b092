"""OPA bundles: build one from a rego/ tree, read and verify one (``policy.bundle``).

The format is OPA's (https://www.openpolicyagent.org/docs/management-bundles), so the same file loads in
the embedded engine, in an OPA server (``opa run --server --bundle bundle.tar.gz``) and in OPA's bundle
plugin:

- a gzipped tarball of ``/.manifest`` (``revision``, ``roots``), the Rego modules at their paths, one
  ``/data.json`` holding the whole data tree (as ``opa build`` writes it), and optionally
  ``/.signatures.json``;
- ``.signatures.json`` is ``{"signatures": ["<JWS compact>"]}``; the JWS payload lists every other file
  as ``{"name", "hash", "algorithm"}``. A Rego file's hash is that of its bytes; a JSON file's
  (``data.json``, ``.manifest``) is that of its canonical form: objects with their keys sorted, no
  white space, numbers as written (so that re-formatting a data file does not break its signature);
- roots: every module's package and every data path lies under one of the manifest's roots, and the
  roots do not overlap one another; a bundle that breaks this is refused, as by OPA.

When a public key is configured, an unsigned bundle, a signature by another key, a file changed, added
or missing since signing are each refused. Signature algorithms: RS256/384/512, PS256/384/512,
ES256/384/512 and EdDSA (never HMAC: the key configured is public).
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .loader import PACKAGE, RUNTIME_DATA_PATH, PolicyBundle, PolicyLoadError, read_policy_dir, refuse_runtime_package

MANIFEST = ".manifest"
SIGNATURES = ".signatures.json"
DATA = "data.json"
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
HASHES = {"SHA-256": "sha256", "SHA-384": "sha384", "SHA-512": "sha512"}
MAX_BUNDLE_BYTES = 64 * 1024 * 1024  # uncompressed, all files together (a gzip bomb stops here)


@dataclass(frozen=True)
class ReadBundle:
    policy: PolicyBundle
    revision: str
    roots: tuple[str, ...]
    signed_by: str | None  # the key id of a verified signature; None when not verified


# ---------------------------------------------------------------- canonical hashing (OPA's bundle/hash.go)


class _Number(str):
    """A JSON number kept as written: OPA hashes numbers by their literal text."""


def _parse_structured(content: bytes, name: str) -> Any:
    try:
        return json.loads(content, parse_float=_Number, parse_int=_Number)
    except ValueError as exc:
        raise PolicyLoadError(name, f"invalid JSON: {exc}") from None


def _encode_string(value: str) -> str:
    # Go's encoder with SetEscapeHTML(false): UTF-8 as is, control characters escaped, U+2028/U+2029 escaped.
    return json.dumps(value, ensure_ascii=False).replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _canonical(value: Any, out: list[str]) -> None:
    if isinstance(value, dict):
        out.append("{")
        for i, key in enumerate(sorted(value)):
            if i:
                out.append(",")
            out.append(_encode_string(key))
            out.append(":")
            _canonical(value[key], out)
        out.append("}")
    elif isinstance(value, list):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _canonical(item, out)
        out.append("]")
    elif isinstance(value, _Number):
        out.append(str.__str__(value))
    elif isinstance(value, str):
        out.append(_encode_string(value))
    else:
        out.append(json.dumps(value))  # true, false, null, and numbers given as Python numbers


def _structured(name: str) -> bool:
    base = posixpath.basename(name)
    return base in (DATA, MANIFEST, "data.yaml", "signatures.json")


def file_hash(name: str, content: bytes, algorithm: str = "SHA-256") -> str:
    digest = hashlib.new(HASHES[algorithm])
    if _structured(name):
        parts: list[str] = []
        _canonical(_parse_structured(content, name), parts)
        digest.update("".join(parts).encode("utf-8"))
    else:
        digest.update(content)
    return digest.hexdigest()


# ---------------------------------------------------------------- roots (OPA's Manifest.validateAndInjectDefaults)


def _contains(roots: Iterable[str], path: str) -> bool:
    return any(root == "" or path == root or path.startswith(root + "/") for root in roots)


def _overlap(a: str, b: str) -> bool:
    return _contains([a], b) or _contains([b], a)


def _check_roots(roots: list[str], modules: dict[str, str], data: Any, origin: str) -> None:
    for i, first in enumerate(roots):
        for second in roots[i + 1:]:
            if _overlap(first, second):
                raise PolicyLoadError(origin, f"manifest has overlapped roots: '{first}' and '{second}'")
    for name, source in modules.items():
        package = PACKAGE.search(source)
        path = package.group(1).replace(".", "/") if package else None
        if path is None or not _contains(roots, path):
            raise PolicyLoadError(f"{origin}:{name}", f"manifest roots {roots} do not permit package "
                                                       f"'{package.group(1) if package else '?'}'")

    def visit(node: Any, path: str) -> None:
        if _contains(roots, path):
            return
        if isinstance(node, dict) and any(root.startswith(path + "/") or path == "" for root in roots):
            for key, value in node.items():
                visit(value, f"{path}/{key}" if path else str(key))
            return
        raise PolicyLoadError(origin, f"manifest roots {roots} do not permit data at path '/{path}' "
                                      "(the data the bundle carries lies outside its roots)")

    visit(data, "")


def default_roots(policy: PolicyBundle) -> list[str]:
    """The first segment of every package and of every top-level data key: what ``opa build`` would need."""
    roots: set[str] = set()
    for source in policy.modules.values():
        package = PACKAGE.search(source)
        if package:
            roots.add(package.group(1).split(".")[0])
    tree = _merged_data(policy)
    roots.update(str(key) for key in tree)
    return sorted(roots)


# ---------------------------------------------------------------- building


def _merged_data(policy: PolicyBundle) -> dict[str, Any]:
    """Every data file of the tree merged into one document, each at its directory's path."""
    merged: dict[str, Any] = {}
    for data_path, value, file in policy.data:
        node: Any = value
        for key in reversed([p for p in data_path.split(".") if p]):
            node = {key: node}
        if not isinstance(node, dict):
            raise PolicyLoadError(file, "a data file at the top of the tree must hold a JSON object")
        _merge_into(merged, node, file, [])
    return merged


def _merge_into(into: dict[str, Any], value: dict[str, Any], file: Path, at: list[str]) -> None:
    for key, item in value.items():
        if key in into and isinstance(into[key], dict) and isinstance(item, dict):
            _merge_into(into[key], item, file, [*at, key])
        elif key in into:
            raise PolicyLoadError(file, f"data.{'.'.join([*at, key])} is set by more than one data file")
        else:
            into[key] = item


def _tar_member(archive: tarfile.TarFile, name: str, content: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    info.mode = 0o644
    info.mtime = 0  # reproducible: the same tree and revision give the same bytes
    archive.addfile(info, io.BytesIO(content))


def build_bundle(policy_dir: Path, *, revision: str, roots: list[str] | None = None,
                 signing_key: bytes | None = None, key_id: str = "default", algorithm: str | None = None) -> bytes:
    """An OPA bundle (.tar.gz bytes) of a rego/ tree, signed when ``signing_key`` (a PEM private key) is given."""
    policy = read_policy_dir(policy_dir)
    roots = sorted({r.strip("/") for r in roots}) if roots else default_roots(policy)
    data = _merged_data(policy)
    _check_roots(roots, policy.modules, data, str(policy_dir))
    files: dict[str, bytes] = {DATA: json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False).encode() + b"\n"}
    for name, source in sorted(policy.modules.items()):
        files[name] = source.encode("utf-8")
    files[MANIFEST] = json.dumps({"revision": revision, "roots": roots, "rego_version": 1}, indent=2).encode() + b"\n"
    if signing_key is not None:
        files[SIGNATURES] = _signatures(files, signing_key, key_id, algorithm)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz", format=tarfile.PAX_FORMAT) as archive:
        for name in sorted(files, key=lambda n: (n != MANIFEST, n)):
            _tar_member(archive, "/" + name, files[name])
    return out.getvalue()


def _signatures(files: dict[str, bytes], signing_key: bytes, key_id: str, algorithm: str | None) -> bytes:
    import jwt
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(signing_key, password=None)
    except (ValueError, TypeError) as exc:
        raise PolicyLoadError("--signing-key", f"not a PEM private key without a password: {exc}") from None
    algorithm = algorithm or _algorithm_for(key)
    if algorithm not in ALGORITHMS:
        raise PolicyLoadError("--signing-key", f"signing algorithm {algorithm} is not one of {', '.join(ALGORITHMS)}")
    entries = [{"name": name, "hash": file_hash(name, content), "algorithm": "SHA-256"}
               for name, content in sorted(files.items())]
    payload = json.dumps({"files": entries, "keyid": key_id}, separators=(",", ":")).encode()
    token = jwt.api_jws.PyJWS().encode(payload, signing_key, algorithm=algorithm, headers={"kid": key_id})
    return json.dumps({"signatures": [token]}, indent=1).encode() + b"\n"


def _algorithm_for(key: Any) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}.get(key.curve.name, "unsupported")
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    return "unsupported"


# ---------------------------------------------------------------- reading


def _members(content: bytes, origin: str) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    total = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(content), mode="r:gz") as archive:
            for member in archive:
                if member.isdir():
                    continue
                name = posixpath.normpath("/" + member.name).lstrip("/")
                if not member.isfile() or name in ("", ".") or name.startswith("../"):
                    raise PolicyLoadError(origin, f"bundle entry {member.name!r} is not a plain file inside the bundle")
                total += member.size
                if total > MAX_BUNDLE_BYTES:
                    raise PolicyLoadError(origin, f"bundle larger than {MAX_BUNDLE_BYTES} bytes uncompressed")
                if name in files:
                    raise PolicyLoadError(origin, f"bundle holds {name} twice")
                extracted = archive.extractfile(member)
                assert extracted is not None
                files[name] = extracted.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise PolicyLoadError(origin, f"not a gzipped tar bundle: {exc}") from None
    return files


def _verify(files: dict[str, bytes], public_key: bytes, key_id: str | None, origin: str) -> str:
    """Check .signatures.json against the key and every file against its signed hash; return the key id."""
    import jwt

    raw = files.get(SIGNATURES)
    if raw is None:
        raise PolicyLoadError(origin, "bundle is not signed (no .signatures.json) and policy.bundle_public_key is set")
    try:
        document = json.loads(raw)
        tokens = document["signatures"]
        assert isinstance(tokens, list)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise PolicyLoadError(origin, ".signatures.json: not {\"signatures\": [JWT]}") from None
    if len(tokens) != 1 or not isinstance(tokens[0], str):
        raise PolicyLoadError(origin, ".signatures.json: expected exactly one JWT")
    try:
        verified = jwt.api_jws.PyJWS().decode_complete(tokens[0], key=public_key, algorithms=list(ALGORITHMS))
    except jwt.PyJWTError as exc:
        raise PolicyLoadError(origin, f".signatures.json: signature not valid for the configured key ({exc})") from None
    try:
        payload = json.loads(verified["payload"])
        signed = {str(f["name"]).lstrip("/"): f for f in payload["files"]}
    except (ValueError, KeyError, TypeError):
        raise PolicyLoadError(origin, ".signatures.json: the signed payload does not list files") from None
    kid = verified["header"].get("kid") or payload.get("keyid")
    if key_id is not None and kid != key_id:
        raise PolicyLoadError(origin, f".signatures.json: signed with key id {kid!r}, policy.bundle_key_id is {key_id!r}")
    if payload.get("scope") not in (None, ""):
        raise PolicyLoadError(origin, ".signatures.json: a scoped signature is not accepted")
    for name, content in files.items():
        if name == SIGNATURES:
            continue
        entry = signed.pop(name, None)
        if entry is None:
            raise PolicyLoadError(origin, f"{name}: not included in the bundle signature")
        algorithm = entry.get("algorithm")
        if algorithm not in HASHES:
            raise PolicyLoadError(origin, f"{name}: hash algorithm {algorithm!r} is not accepted")
        if file_hash(name, content, algorithm) != str(entry.get("hash", "")).lower():
            raise PolicyLoadError(origin, f"{name}: digest mismatch (changed since it was signed)")
    if signed:
        raise PolicyLoadError(origin, f"file(s) {sorted(signed)} signed but not found in the bundle")
    return str(kid)


def read_bundle(content: bytes, *, origin: Path | str, public_key: bytes | None = None, key_id: str | None = None,
                verify: bool = True) -> ReadBundle:
    """Read (and verify) an OPA bundle; every refusal is a PolicyLoadError naming what is wrong.

    With ``public_key``, only a bundle signed with its private key loads. Without one, a signed bundle is
    refused too (as by OPA: a signature nobody checks is a configuration mistake), unless ``verify`` is
    False (the policy tools, on a bundle the engineer already holds).
    """
    origin = str(origin)
    files = _members(content, origin)
    signed_by = None
    if public_key is not None:
        signed_by = _verify(files, public_key, key_id, origin)
    elif SIGNATURES in files and verify:
        raise PolicyLoadError(origin, "bundle is signed but no policy.bundle_public_key is configured to verify it")
    manifest: dict[str, Any] = {}
    if MANIFEST in files:
        try:
            manifest = json.loads(files[MANIFEST])
            assert isinstance(manifest, dict)
        except (ValueError, AssertionError):
            raise PolicyLoadError(f"{origin}:{MANIFEST}", "not a JSON object") from None
    revision = manifest.get("revision") or f"sha256:{hashlib.sha256(content).hexdigest()}"
    roots_value = manifest.get("roots", [""])
    if not isinstance(roots_value, list) or not all(isinstance(r, str) for r in roots_value) or not isinstance(revision, str):
        raise PolicyLoadError(f"{origin}:{MANIFEST}", "revision must be a string and roots a list of strings")
    roots = [r.strip("/") for r in roots_value]
    policy = PolicyBundle(root=Path(origin))
    data: dict[str, Any] = {}
    for name in sorted(files):
        base = posixpath.basename(name)
        if name.endswith(".rego"):
            try:
                policy.modules[name] = files[name].decode("utf-8")
            except UnicodeDecodeError:
                raise PolicyLoadError(f"{origin}:{name}", "not UTF-8") from None
            refuse_runtime_package(f"{origin}:{name}", policy.modules[name])
        elif base == DATA:
            value = _parse_plain(files[name], f"{origin}:{name}")
            directory = [p for p in posixpath.dirname(name).split("/") if p]
            if any("." in key for key in directory):  # the engine reads '.' as a path separator: another path
                raise PolicyLoadError(f"{origin}:{name}", "a data directory's name holds '.'")
            node: Any = value
            for key in reversed(directory):
                node = {key: node}
            if not isinstance(node, dict):
                raise PolicyLoadError(f"{origin}:{name}", "the top-level data.json must hold a JSON object")
            _merge_into(data, node, Path(f"{origin}:{name}"), [])
            policy.data.append((".".join(directory), value, Path(f"{origin}:{name}")))
        elif base in ("data.yaml", "data.yml", "policy.wasm", "plan.json", "patch.json"):
            raise PolicyLoadError(f"{origin}:{name}", "not supported by the sidecar's bundle reader (Rego and data.json only)")
    if not policy.modules:
        raise PolicyLoadError(origin, "bundle holds no .rego files")
    _check_roots(roots, policy.modules, data, origin)
    runtime: Any = data
    for key in RUNTIME_DATA_PATH.split("."):
        runtime = runtime.get(key) if isinstance(runtime, dict) else None
    if runtime is not None:
        raise PolicyLoadError(origin, f"data.{RUNTIME_DATA_PATH} is set by the sidecar, not by a bundle")
    return ReadBundle(policy, revision, tuple(roots), signed_by)


def _parse_plain(content: bytes, where: str) -> Any:
    try:
        return json.loads(content)
    except ValueError as exc:
        raise PolicyLoadError(where, f"invalid JSON: {exc}") from None


def read_policy(path: Path, *, public_key: bytes | None = None, key_id: str | None = None,
                verify: bool = True) -> tuple[PolicyBundle, str]:
    """A policy directory or bundle file, and its revision (the tools: replay, shadow)."""
    from .loader import content_revision, policy_from_files, read_policy_files

    path = Path(path)
    if path.is_dir():
        files = read_policy_files(path)
        return policy_from_files(path, files), content_revision(files)
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise PolicyLoadError(path, f"cannot read: {exc.strerror or exc}") from None
    read = read_bundle(content, origin=path, public_key=public_key, key_id=key_id, verify=verify)
    return read.policy, read.revision
