"""Rendering for operator commands: aligned tables for people, one JSON document for scripts.

Times are shown as ISO-8601 UTC (``2026-01-02T03:04:05Z``) or relative to now (``in 3d``,
``5m ago``); JSON always carries the ISO form. Nothing here ever receives a secret value: the
callers hand over rows built from database columns (fingerprints and provider key ids only).
"""

from __future__ import annotations

import enum
import json
import os
import shutil
import sys
from datetime import datetime, timedelta
from typing import Any, Iterable, Sequence, TextIO

import typer
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

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


class OutputFormat(str, enum.Enum):
    """``-o``: ``table`` (people), ``wide`` (more columns, no truncation), ``json``/``yaml`` (scripts)."""

    table = "table"
    wide = "wide"
    json = "json"
    yaml = "yaml"


def output_option() -> Any:
    return typer.Option(None, "--output", "-o", case_sensitive=False,
                        help="table (default), wide, json or yaml (see docs/cli-output.md).")


def json_option() -> Any:
    return typer.Option(False, "--json", help="Same as -o json (kept for scripts).", show_default=False)


def pick_format(output: OutputFormat | None, json_out: bool) -> OutputFormat:
    """``-o`` wins; ``--json`` is its older spelling."""
    if output is not None:
        return OutputFormat(output)
    return OutputFormat.json if json_out else OutputFormat.table


def emit(document: Any, fmt: OutputFormat, stream: TextIO | None = None) -> None:
    """Print one JSON or YAML document (the same shape either way: enums as values, ISO times)."""
    if fmt is OutputFormat.yaml:
        import yaml

        stream = stream or sys.stdout
        stream.write(yaml.safe_dump(json.loads(dumps(document)), sort_keys=False, allow_unicode=True))
        stream.flush()
    else:
        print_json(document, stream)


# ---------------------------------------------------------------- colour
#: ``--no-color`` on the command line; NO_COLOR in the environment and a non-terminal stdout do the same.
_colour_off = False


def disable_colour() -> None:
    global _colour_off
    _colour_off = True


def colour_enabled(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stdout
    if _colour_off or os.environ.get("NO_COLOR"):  # https://no-color.org: any non-empty value
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


_STATE_STYLES = {
    "completed": "green", "idle": "green", "verified": "green", "retired": "green", "ok": "green",
    "needs_attention": "bold red", "failed": "bold red", "rolled_back": "yellow", "cancelled": "yellow",
    "awaiting_deposit": "magenta", "unseeded": "yellow", "disabled": "dim", "in_grace": "cyan",
}


def state_text(state: str | None) -> Text:
    """A state or stage, coloured by what it asks of a person (green fine, red act, yellow look)."""
    value = state or "-"
    return Text(value, style=_STATE_STYLES.get(value, "cyan" if state else ""))


def console(stream: TextIO | None = None, width: int | None = None) -> Console:
    """A console that colours only a terminal (and never with NO_COLOR / ``--no-color``)."""
    stream = stream or sys.stdout
    colour = colour_enabled(stream)
    return Console(file=stream, width=width or terminal_width(stream), highlight=False,
                   color_system="auto" if colour else None, no_color=not colour, force_terminal=colour or None,
                   soft_wrap=False, emoji=False, markup=False)


def terminal_width(stream: TextIO | None = None) -> int:
    """The terminal's width, or 240 when stdout is a pipe (room for full identifiers and some prose)."""
    stream = stream or sys.stdout
    tty = bool(getattr(stream, "isatty", lambda: False)())
    return max(shutil.get_terminal_size((200, 24)).columns, 80) if tty else 240


def clip(text: str | None, width: int) -> str:
    """Whitespace folded to single spaces; cut to ``width`` with an ellipsis (never silently)."""
    if not text:
        return "-"
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


_GAP = 2  # columns between table cells
_MIN_PROSE = 16


def print_table(columns: Sequence[str], rows: Iterable[Sequence[Any]], *, title: str | None = None,
                stream: TextIO | None = None, empty: str = "(none)", prose: Iterable[str] = (),
                wide: bool = False) -> None:
    """An aligned, borderless table; ``empty`` is printed instead when there are no rows.

    Identifier columns are never cut: they get their full width. Only the ``prose`` columns (free
    text such as errors and details) are shortened, with an ellipsis, to fit the terminal; with
    ``wide`` nothing is shortened. ``describe``/``-o json`` show any text in full.
    """
    cells = [[_cell(value) for value in row] for row in rows]
    prose_idx = [i for i, name in enumerate(columns) if name in set(prose)]
    widths = [max([len(name)] + [cell_len(row[i].plain) for row in cells]) for i, name in enumerate(columns)]
    budget = terminal_width(stream)
    if prose_idx and not wide:
        fixed = sum(w for i, w in enumerate(widths) if i not in prose_idx) + _GAP * (len(columns) - 1)
        share = max(_MIN_PROSE, (budget - fixed) // len(prose_idx))
        for i in prose_idx:
            widths[i] = min(widths[i], max(share, len(columns[i])))
            for row in cells:
                if cell_len(row[i].plain) > widths[i]:
                    row[i].truncate(widths[i], overflow="ellipsis")
    total = sum(widths) + _GAP * (len(columns) - 1)
    out = console(stream, width=max(budget, total))  # wider than the terminal rather than cropped
    if title:
        out.print(title)
    if not cells:
        out.print(empty)
        return
    table = Table(box=None, show_edge=False, pad_edge=False, padding=(0, _GAP // 2),
                  header_style="bold" if out.is_terminal else "")
    for name, width in zip(columns, widths):
        table.add_column(name.upper(), no_wrap=True, min_width=width, max_width=width, overflow="ellipsis")
    for row in cells:
        table.add_row(*row)
    with out.capture() as captured:
        out.print(table)
    out.file.write("\n".join(line.rstrip() for line in captured.get().splitlines()) + "\n")
    out.file.flush()


def _cell(value: Any) -> Text:
    if isinstance(value, Text):
        text = value.copy()
    else:
        text = Text("-" if value is None else str(value))
    if "\n" in text.plain:
        text = Text(" ".join(text.plain.split()), style=text.style)
    return text
