"""A small JSONPath subset for provider responses: ``$``, ``$.a.b``, ``$.a[0].b``, ``$['a-b']``.

Enough to point at a secret, key id or list in a JSON answer; anything fancier (filters,
wildcards, recursion) is refused at config time so a typo is found early, not mid-rotation.
"""

from __future__ import annotations

import re
from typing import Any

_TOKEN = re.compile(r"\.([A-Za-z_][A-Za-z0-9_\-]*)|\[(\d+)\]|\['([^']+)'\]|\[\"([^\"]+)\"\]")


class JsonPathError(ValueError):
    """The path is malformed, or the document has nothing at it."""


def compile_path(path: str) -> tuple[str | int, ...]:
    """Parse ``path`` into steps (names and list indexes); raise ``JsonPathError`` when unsupported."""
    if not isinstance(path, str) or not path.startswith("$"):
        raise JsonPathError(f"JSON path {path!r} must start with '$' (e.g. '$.data.apiKey')")
    steps: list[str | int] = []
    pos = 1
    while pos < len(path):
        match = _TOKEN.match(path, pos)
        if not match:
            raise JsonPathError(f"JSON path {path!r}: unsupported syntax at {path[pos:]!r} (use .name, [index] or ['name'])")
        name, index, quoted1, quoted2 = match.groups()
        steps.append(int(index) if index is not None else (name or quoted1 or quoted2))
        pos = match.end()
    return tuple(steps)


def extract(document: Any, path: str) -> Any:
    """The value at ``path``; ``JsonPathError`` when absent (never returns a silent None)."""
    current = document
    for step in compile_path(path):
        if isinstance(step, int):
            if not isinstance(current, list) or step >= len(current):
                raise JsonPathError(f"nothing at {path!r}: expected a list with an element {step}")
            current = current[step]
        else:
            if not isinstance(current, dict) or step not in current:
                raise JsonPathError(f"nothing at {path!r}: no field {step!r}")
            current = current[step]
    return current
