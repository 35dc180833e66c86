"""Placeholder: filled in by its issue. Commands here say plainly they are not built yet."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True)
