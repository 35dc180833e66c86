"""Rendering for operator commands: aligned tables for people, one JSON document for scripts.

Times are shown as ISO-8601 UTC (``2026-01-02T03:04:05Z``) or relative to now (``in 3d``,
``5m ago``); JSON always carries the ISO form. Nothing here ever receives a secret value: the
callers hand over rows built from database columns (fingerprints and provider key ids only).
"""

from __future__ import annotations

import enum
import json
import shutil
import sys
from datetime import datetime, timedelta
from typing import Any, Iterable, Sequence, TextIO

from rich.console import Console
from rich.table import Table

from worker.clock import as_utc, utcnow


def iso(value: datetime | None) -> str | None:
    """``2026-01-02T03:04:05Z`` (second precision), or None."""
    value = as_utc(value)
    if value is None:
        return None
    return value.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def relative(value: datetime | None, now: datetime | None = None) -> str:
    """``in 3d``, ``2h ago``, ``now`` — coarse, for a person scanning a table."""
    value = as_utc(value)
    if value is None:
        return "-"
    now = as_utc(now) or utcnow()
    delta = value - now
    future = delta >= timedelta(0)
    text = _span(abs(delta))
    if text == "0s":
        return "now"
    return f"in {text}" if future else f"{text} ago"


def _span(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def duration(seconds: float | None) -> str:
    """``0.8s``, ``12s``, ``3m05s``."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def short_fp(fp: str | None) -> str:
    """``sha256:1a2b3c4d`` → ``1a2b3c4d`` (8 hex digits are plenty to tell keys apart on screen)."""
    if not fp:
        return "-"
    return fp.split(":", 1)[-1][:8]


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, timedelta):
        return value.total_seconds()
    raise TypeError(f"cannot render {type(value).__name__} as JSON")


def dumps(document: Any) -> str:
    return json.dumps(document, default=_jsonable, indent=2, sort_keys=False)


def print_json(document: Any, stream: TextIO | None = None) -> None:
    """Print exactly one JSON document (the whole stdout of a ``--json`` command)."""
    stream = stream or sys.stdout
    stream.write(dumps(document) + "\n")
    stream.flush()


def console(stream: TextIO | None = None) -> Console:
    """A console that does not wrap or colour when stdout is a pipe (scripts, tests)."""
    stream = stream or sys.stdout
    tty = bool(getattr(stream, "isatty", lambda: False)())
    width = shutil.get_terminal_size((200, 24)).columns if tty else 240
    return Console(file=stream, width=max(width, 80), highlight=False, color_system="auto" if tty else None,
                   soft_wrap=False, emoji=False, markup=False)


def print_table(columns: Sequence[str], rows: Iterable[Sequence[Any]], *, title: str | None = None,
                stream: TextIO | None = None, empty: str = "(none)") -> None:
    """An aligned, borderless table; ``empty`` is printed instead when there are no rows."""
    rows = [["-" if cell is None else str(cell) for cell in row] for row in rows]
    out = console(stream)
    if title:
        out.print(title)
    if not rows:
        out.print(empty)
        return
    table = Table(box=None, show_edge=False, pad_edge=False, header_style="bold" if out.is_terminal else "")
    for name in columns:
        table.add_column(name.upper(), no_wrap=True, overflow="fold")
    for row in rows:
        table.add_row(*row)
    out.print(table)
