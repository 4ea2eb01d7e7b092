"""The policy-engine protocol."""

from __future__ import annotations

from typing import Any, Protocol


class PolicyError(Exception):
    """The engine gave no usable answer: unreachable, failed, or undefined."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind  # unreachable | error | undefined | timeout | malformed | overloaded
        self.message = message


class PolicyEngine(Protocol):
    """Evaluates the document at a decision path, e.g. ``sidecar/authz/decision``."""

    name: str

    async def evaluate(self, path: str, input_document: dict[str, Any]) -> Any:
        """Return the decision document; raise PolicyError when there is none."""
        ...

    async def close(self) -> None: ...
