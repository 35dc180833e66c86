"""Operator commands: ``status``, ``history``, ``runs`` (read-only) and ``rotate``, ``deposit``,
``worker`` (act through the pipeline). Tables for people, ``--json`` for scripts.

Exit codes: 0 ok · 1 the operation failed · 2 usage or configuration error · 3 timed out waiting.
"""

from __future__ import annotations

from typing import Any, Optional

import typer

from worker.cli.common import EXIT_USAGE, cli_settings, fail, find_key, open_database
from worker.cli.output import duration, iso, print_json, print_table, relative, short_fp
from worker.clock import utcnow
from worker.db.session import session_scope


def status(json_out: bool = typer.Option(False, "--json", help="Print one JSON document instead of a table.")) -> None:
    """Every managed key: provider, stage, expiry, next due time, last run and its state."""
    from worker.cli.views import key_status

    settings = cli_settings()
    engine = open_database(settings)
    with session_scope(engine) as session:
        rows = key_status(session)
    if json_out:
        print_json({"generated_at": utcnow(), "keys": rows})
        return
    now = utcnow()
    table = []
    for r in rows:
        run = r["last_run"]
        due = relative(r["next_due_at"], now) + (f" ({r['due_reason']})" if r["due_reason"] else "")
        table.append([
            r["key"], r["provider"], r["stage"], short_fp(r["current_fingerprint"]),
            relative(r["expires_at"], now) if r["expires_at"] else "-",
            due if r["next_due_at"] else "-",
            f"{run['state']} {relative(run['finished_at'] or run['updated_at'] or run['created_at'], now)}" if run else "-",
            run["id"] if run else "-",
        ])
    print_table(["key", "provider", "stage", "current", "expires", "next due", "last run", "run id"], table,
                empty="no managed keys; load an inventory with `keyrotor config apply FILE`")
    for provider, guard in sorted({(r["provider"], r["orphan_guard"]) for r in rows if r["orphan_guard"]}):
        typer.echo(f"provider {provider}: {guard}")
    unseeded = [r["key"] for r in rows if r["stage"] == "unseeded"]
    if unseeded:
        typer.echo(f"unseeded ({', '.join(unseeded)}): keyrotor has no current key on record; if the key exists "
                   "(at the provider and in Vault) run `keyrotor adopt KEY`, else `keyrotor rotate KEY` issues the first one")


def history(
    key: str = typer.Argument(..., help="Managed key name, as in the inventory."),
    limit: int = typer.Option(20, "--limit", min=1, help="How many of the most recent runs."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document instead of tables."),
) -> None:
    """A key's runs and its audit trail (every state change, in order, with who caused it)."""
    from worker.cli.views import key_history

    settings = cli_settings()
    engine = open_database(settings)
    with session_scope(engine) as session:
        doc = key_history(session, find_key(session, key), limit=limit)
    if json_out:
        print_json(doc)
        return
    print_table(["run id", "state", "trigger", "reason", "requested by", "created", "duration", "error"],
                [[r["id"], r["state"], r["trigger"], r["reason"], r["requested_by"], iso(r["created_at"]),
                  duration(r["duration_s"]), _clip(r["last_error"])] for r in doc["runs"]],
                title=f"runs of {key}", empty="no runs yet")
    typer.echo()
    print_table(["at", "run", "actor", "event", "transition", "detail"],
                [[iso(e["at"]), (e["run_id"] or "-")[:12], e["actor"], e["event"], _transition(e),
                  _detail(e["detail"])] for e in doc["events"]],
                title="audit trail", empty="no audit events")
    typer.echo()
    print_table(["version", "stage", "fingerprint", "provider key id", "vault v", "issued", "retired"],
                [[v["id"], v["stage"], short_fp(v["fingerprint"]), v["provider_key_id"], v["vault_version"],
                  iso(v["issued_at"]), iso(v["retired_at"])] for v in doc["versions"]],
                title="credentials", empty="no credentials recorded")


def runs(
    state: Optional[str] = typer.Option(None, "--state", help="A run state (e.g. needs_attention), or open / terminal."),
    key: Optional[str] = typer.Option(None, "--key", help="Only this key's runs."),
    limit: int = typer.Option(50, "--limit", min=1, help="At most this many, newest first."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document instead of a table."),
) -> None:
    """Rotation runs, newest first."""
    from worker.cli.views import list_runs, parse_state_filter

    try:
        state_filter = parse_state_filter(state)
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)
    settings = cli_settings()
    engine = open_database(settings)
    with session_scope(engine) as session:
        key_row = find_key(session, key) if key else None
        rows = list_runs(session, state=state_filter, key=key_row, limit=limit)
    if json_out:
        print_json({"runs": rows})
        return
    now = utcnow()
    print_table(["run id", "key", "state", "trigger", "reason", "created", "updated", "duration", "error"],
                [[r["id"], r["key"], r["state"], r["trigger"], r["reason"], iso(r["created_at"]),
                  relative(r["updated_at"], now), duration(r["duration_s"]), _clip(r["last_error"])] for r in rows],
                empty="no runs" + (f" in state {state_filter}" if state_filter else ""))


def _transition(event: dict[str, Any]) -> str:
    if event["from_state"] or event["to_state"]:
        return f"{event['from_state'] or '-'} → {event['to_state'] or '-'}"
    return "-"


def _detail(detail: dict[str, Any], width: int = 80) -> str:
    parts = []
    for name, value in detail.items():
        if isinstance(value, str) and value.startswith("sha256:"):
            value = short_fp(value)
        parts.append(f"{name}={value}")
    return _clip(" ".join(parts), width) or "-"


def _clip(text: str | None, width: int = 60) -> str:
    if not text:
        return "-"
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def register(app: typer.Typer) -> None:
    app.command("status")(status)
    app.command("history")(history)
    app.command("runs")(runs)
    from worker.cli import act_cmds, adopt_cmd, worker_cmd

    act_cmds.register(app)
    adopt_cmd.register(app)
    worker_cmd.register(app)
