"""A value that must never reach a log, an audit line or an error message."""

from __future__ import annotations


class Secret:
    """Wraps a secret string; its repr and str are masked.

    Only :meth:`reveal` gives the value, so every place that handles the real
    secret is greppable.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    def __str__(self) -> str:
        return "**********"

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)
