"""Small wording helpers shared by messages and summaries."""

from __future__ import annotations


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``1 provider``, ``3 providers`` (``plural`` for irregular nouns)."""
    return f"{n} {noun if n == 1 else (plural or noun + 's')}"
