"""Small wording helpers shared by messages and summaries."""

from __future__ import annotations

import re


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``1 provider``, ``3 providers`` (``plural`` for irregular nouns)."""
    return f"{n} {noun if n == 1 else (plural or noun + 's')}"


def key_slug(name: str) -> str:
    """A key name made safe for a path segment or an identifier: ``alloy/billing`` → ``alloy-billing``."""
    return re.sub(r"[^a-z0-9_.-]+", "-", name.lower()).strip("-")
