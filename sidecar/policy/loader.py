"""Load a rego/ tree the way ``opa run DIR`` does: modules plus data.json files."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class PolicyLoadError(Exception):
    def __init__(self, path: Path | str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = str(path)
        self.message = message


@dataclass
class PolicyBundle:
    """Rego modules keyed by their path relative to the root, and data documents by their data path."""

    root: Path
    modules: dict[str, str] = field(default_factory=dict)
    data: list[tuple[str, Any]] = field(default_factory=list)  # (dotted path or "", value)


def _hidden(path: Path, root: Path) -> bool:
    """Like `opa run --ignore=.*`: a ConfigMap volume holds every file twice, once under ..<timestamp>/."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def read_policy_dir(root: Path) -> PolicyBundle:
    """Read every *.rego and data.json under root; a data.json merges at its directory's path."""
    if not root.is_dir():
        raise PolicyLoadError(root, "not a directory")
    bundle = PolicyBundle(root=root)
    for path in sorted(p for p in root.rglob("*.rego") if not _hidden(p, root)):
        bundle.modules[path.relative_to(root).as_posix()] = path.read_text(encoding="utf-8")
    for path in sorted(p for p in root.rglob("data.json") if not _hidden(p, root)):
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise PolicyLoadError(path, f"invalid JSON: {exc}") from None
        relative = path.parent.relative_to(root)
        bundle.data.append((".".join(relative.parts), value))
    if not bundle.modules:
        raise PolicyLoadError(root, "no .rego files")
    return bundle
