"""``keyrotor plan``: what will rotate when, and why."""

from __future__ import annotations

import math
from typing import Optional

import typer

from worker.cli.common import cli_settings, fail, open_database
from worker.cli.output import OutputFormat, emit, iso, json_option, output_option, pick_format, print_table, relative
from worker.clock import utcnow
from worker.db.session import session_scope
from worker.service.plan import build_plan


#: ``plan --days`` upper bound: a century ahead is already far past any key's lifetime.
PLAN_MAX_DAYS = 36_500


def plan(
    days: float = typer.Option(30.0, "--days", min=0, help=f"How far ahead to look (at most {PLAN_MAX_DAYS})."),
    output: Optional[OutputFormat] = output_option(),
    json_out: bool = json_option(),
) -> None:
    """What will rotate when, and why (expiry, age, deprecation), incl. keys a person must rotate."""
    if not math.isfinite(days) or days > PLAN_MAX_DAYS:
        fail(f"--days {days:g} is too far ahead; give at most {PLAN_MAX_DAYS}")
    fmt = pick_format(output, json_out)
    settings = cli_settings()
    engine = open_database(settings, read_only=True)
    now = utcnow()
    with session_scope(engine) as session:
        items = build_plan(session, now=now, days=days)
    if fmt in (OutputFormat.json, OutputFormat.yaml):
        emit({"generated_at": now, "days": days, "items": [item.as_dict() for item in items]}, fmt)
        return
    rows, notes = [], []
    for item in items:
        when = "overdue" if item.overdue else relative(item.when, now)
        what = item.action if item.target_credential_type == item.credential_type else f"{item.action} → {item.target_credential_type}"
        if item.run_state:
            what += f" ({item.run_state})"
        rows.append([iso(item.when), when, item.key + (" [admin]" if item.admin else ""), item.provider, item.reason, what])
        if item.note:
            notes.append(f"  {item.key}: {item.note}")
    print_table(["when", "due", "key", "provider", "why", "action"], rows, wide=fmt is OutputFormat.wide,
                title=f"Rotations in the next {days:g} days", empty=f"Nothing rotates in the next {days:g} days.")
    if notes:
        typer.echo("\nNotes:\n" + "\n".join(notes))


def register(app: typer.Typer) -> None:
    app.command("plan")(plan)
