"""Load a rego/ tree the way ``opa run DIR`` does: modules plus data.json files."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


# Data the sidecar itself sets in an embedded engine (see embedded.check_data_once); no data file may.
RUNTIME_DATA_PATH = "sidecar.runtime"


class PolicyLoadError(Exception):
    def __init__(self, path: Path | str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = str(path)
        self.message = message
        self.revision: str | None = None  # the refused candidate's revision, when it was known


@dataclass
class PolicyBundle:
    """Rego modules keyed by their path relative to the root, and data documents by their data path."""

    root: Path
    modules: dict[str, str] = field(default_factory=dict)
    data: list[tuple[str, Any, Path]] = field(default_factory=list)  # (dotted data path or "", value, file)


def _hidden(path: Path, root: Path) -> bool:
    """Like `opa run --ignore=.*`: a ConfigMap volume holds every file twice, once under ..<timestamp>/."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _is_data_file(path: Path) -> bool:
    return path.name == "data.json" or path.name.endswith(".data.json")


def read_policy_files(root: Path) -> dict[str, bytes]:
    """Every *.rego and data file (data.json, *.data.json) under root, by relative path, skipping hidden paths.

    Read once into memory, so that what is loaded and what its revision hashes are the same bytes
    even while a ConfigMap update swaps the files underneath.
    """
    root = Path(root)
    if not root.is_dir():
        raise PolicyLoadError(root, "not a directory")
    files: dict[str, bytes] = {}
    seen: set[str] = set()
    # Symlinked directories are followed (a ConfigMap volume with nested item paths links each one
    # through ..data), hidden ones never (..data itself, ..<timestamp>/), and no real directory twice.
    for directory, subdirectories, names in os.walk(root, followlinks=True):
        real = os.path.realpath(directory)
        if real in seen:
            subdirectories[:] = []
            continue
        seen.add(real)
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        for name in sorted(names):
            path = Path(directory) / name
            if name.startswith(".") or not (path.suffix == ".rego" or _is_data_file(path)):
                continue
            try:
                if not path.is_file():
                    continue
                files[path.relative_to(root).as_posix()] = path.read_bytes()
            except OSError as exc:
                raise PolicyLoadError(path, f"cannot read: {exc}") from None
    return files


def content_revision(files: dict[str, bytes]) -> str:
    """``sha256:<hex>`` over every file's relative path and bytes: the revision of a policy directory."""
    digest = hashlib.sha256()
    for name in sorted(files):
        content = files[name]
        digest.update(f"{name}\0{len(content)}\0".encode())
        digest.update(content)
    return f"sha256:{digest.hexdigest()}"


def read_policy_dir(root: Path) -> PolicyBundle:
    """Read every *.rego and data file (data.json, *.data.json) under root, skipping hidden paths.

    Modules are named by their path relative to root; a data file merges at the data path of
    its directory (``a/b/data.json`` at ``data.a.b``, one at the top at the root), as ``opa run`` does.
    """
    return policy_from_files(Path(root), read_policy_files(root))


def policy_from_files(root: Path, files: dict[str, bytes]) -> PolicyBundle:
    """A PolicyBundle from files already read (relative path -> bytes); errors name ``root / path``."""
    bundle = PolicyBundle(root=root)
    for name in sorted(n for n in files if n.endswith(".rego")):
        bundle.modules[name] = _decode(root / name, files[name])
        refuse_runtime_package(root / name, bundle.modules[name])
    for name in sorted(n for n in files if _is_data_file(Path(n))):
        path = root / name
        parts = Path(name).parent.parts
        if any("." in part for part in parts):
            raise PolicyLoadError(path, "a data file's directory names its data path and must not contain '.'")
        try:
            value = json.loads(_decode(path, files[name]))
        except ValueError as exc:
            raise PolicyLoadError(path, f"invalid JSON: {exc}") from None
        if _sets_runtime_data(parts, value):
            raise PolicyLoadError(path, f"data.{RUNTIME_DATA_PATH} is set by the sidecar, not by a data file")
        bundle.data.append((".".join(parts), value, path))
    if not bundle.modules:
        raise PolicyLoadError(root, "no .rego files")
    return bundle


PACKAGE = re.compile(r"^\s*package\s+([A-Za-z_][\w.]*)", re.MULTILINE)  # a module's package line


def refuse_runtime_package(path: Path | str, source: str) -> None:
    """A module in package sidecar.runtime or below would define what the sidecar sets there (the data check's
    verdict, ``derived``): refused wherever a policy is read, for the embedded engine and for an OPA server's
    bundle alike (the embedded engine also asks the engine itself at load: sidecar.policy.embedded)."""
    found = PACKAGE.search(source)
    if found and (found.group(1) + ".").startswith(RUNTIME_DATA_PATH + "."):
        raise PolicyLoadError(path, f"package {found.group(1)}: data.{RUNTIME_DATA_PATH} is set by the sidecar, "
                                    "not by a policy")


def _decode(path: Path, content: bytes) -> str:
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyLoadError(path, f"cannot read: {exc}") from None


def _sets_runtime_data(parts: tuple[str, ...], value: Any) -> bool:
    """Whether a data document merged at ``parts`` would write anything under RUNTIME_DATA_PATH."""
    for key in reversed(parts):
        value = {key: value}
    for key in RUNTIME_DATA_PATH.split("."):
        if not isinstance(value, dict) or key not in value:
            return False
        value = value[key]
    return True


class OpaModuleSink(Protocol):
    """The part of ``opa_bindings.OpaEngine`` that loading needs."""

    def add_policy(self, path: str, source: str) -> Any: ...

    def add_data(self, value: Any, path: str = "") -> Any: ...

    def eval_query(self, query: str, input: Any = None, *, coverage: bool = False,
                   trace: bool = False) -> list[dict[str, Any]]: ...


# "sidecar/authz/x.rego:12: rego_type_error: ..." in a compile error.
_ERROR_LOCATION = re.compile(r"([^\s:]+\.rego):\d+")


def load_bundle(engine: OpaModuleSink, bundle: PolicyBundle) -> list[str]:
    """Add the bundle's modules and data to an engine; every error names the file it comes from.

    Type and safety errors only surface when a query is prepared, so one is prepared here:
    a broken policy fails at load, not on the first call.
    """
    import opa_bindings

    for name, source in bundle.modules.items():
        try:
            engine.add_policy(name, source)
        except opa_bindings.OpaError as exc:
            raise PolicyLoadError(bundle.root / name, exc.message.strip()) from None
    for data_path, value, file in bundle.data:
        try:
            engine.add_data(value, data_path)
        except opa_bindings.OpaError as exc:
            raise PolicyLoadError(file, exc.message.strip()) from None
    try:
        engine.eval_query("true")
    except opa_bindings.OpaError as exc:
        named = [m for m in _ERROR_LOCATION.findall(exc.message) if m in bundle.modules]
        raise PolicyLoadError(bundle.root / named[0] if named else bundle.root, exc.message.strip()) from None
    return list(bundle.modules)
