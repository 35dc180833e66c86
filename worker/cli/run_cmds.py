"""Placeholder until the pipeline lands: rotate, status, history, runs, worker, deposit."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    pass
