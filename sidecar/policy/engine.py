"""The policy-engine protocol."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


class PolicyError(Exception):
    """The engine gave no usable answer: unreachable, failed, or undefined."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind  # unreachable | error | undefined | timeout | malformed | overloaded
        self.message = message


@dataclass(frozen=True)
class Evaluation:
    """A decision document and the policy that produced it: bundle name -> revision (OPA's ``bundles``).

    The embedded engine names the revision loaded in the very engine that evaluated; the REST engine
    reads it from OPA's answer (``?provenance=true``). Empty when the engine cannot tell.
    """

    result: Any
    bundles: Mapping[str, str] = field(default_factory=dict)


class PolicyEngine(Protocol):
    """Evaluates the document at a decision path, e.g. ``sidecar/authz/decision``."""

    name: str

    async def evaluate(self, path: str, input_document: dict[str, Any]) -> Any:
        """Return the decision document; raise PolicyError when there is none."""
        ...

    async def evaluate_with_provenance(self, path: str, input_document: dict[str, Any]) -> Evaluation:
        """The decision document and the revision of the policy that evaluated it."""
        ...

    async def close(self) -> None: ...
