"""A wrapper that keeps secret values out of reprs, logs and exception reports."""

from __future__ import annotations

import hashlib
from typing import Any


class Secret:
    """Holds a secret string; ``str()``/``repr()`` never show it, only ``reveal()`` does."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str) or not value:
            raise ValueError("a secret must be a non-empty string")
        self._value = value

    def reveal(self) -> str:
        return self._value

    @property
    def fingerprint(self) -> str:
        return fingerprint(self._value)

    def __repr__(self) -> str:
        return f"Secret(fingerprint={self.fingerprint!r})"

    __str__ = __repr__

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __reduce__(self) -> Any:  # never pickled into a queue message or cache
        raise TypeError("Secret values cannot be pickled")


def fingerprint(value: str) -> str:
    """A short, stable identifier of a secret: SHA-256 truncated to 16 hex digits.

    Safe to store and log because provider-issued keys are high-entropy; it lets consumers, sinks
    and the audit trail say *which* key they hold without holding it.
    """
    return "sha256:" + hashlib.sha256(value.encode("utf-8")).hexdigest()[:16]
