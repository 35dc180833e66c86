"""Operator commands: ``status``, ``history``, ``runs`` (read-only) and ``rotate``, ``deposit``,
``worker`` (act through the pipeline), ``describe``/``show`` (one run in full). Tables for people,
``-o json|yaml`` for scripts (``--json`` is ``-o json``), ``-o wide`` for more columns.

Exit codes: 0 ok · 1 the operation failed · 2 usage or configuration error · 3 timed out waiting.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import typer

from worker.cli.common import EXIT_USAGE, cli_settings, fail, find_key, find_run, open_database
from worker.cli.output import (
    OutputFormat,
    clip,
    duration,
    emit,
    iso,
    json_option,
    output_option,
    pick_format,
    print_table,
    relative,
    short_fp,
    state_text,
)
from worker.clock import utcnow
from worker.db.session import session_scope

# Commands import the service modules they use inside the command function, not here:
# `keyrotor --help` and each command start without importing the whole service (start-up cost).


def status(
    provider: Optional[str] = typer.Option(None, "--provider", help="Only this provider's keys."),
    stage: Optional[str] = typer.Option(None, "--stage", help="Only keys at this stage (idle, in_grace, unseeded, disabled or a run state)."),
    output: Optional[OutputFormat] = output_option(),
    json_out: bool = json_option(),
) -> None:
    """Every managed key: provider, stage, expiry, next due time, last run and its state."""
    from worker.cli.views import key_status, parse_stage_filter

    fmt = pick_format(output, json_out)
    try:
        stage_filter = parse_stage_filter(stage)
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)
    settings = cli_settings()
    engine = open_database(settings, read_only=True)
    with session_scope(engine) as session:
        rows = key_status(session, provider=provider, stage=stage_filter)
    if fmt in (OutputFormat.json, OutputFormat.yaml):
        emit({"generated_at": utcnow(), "keys": rows}, fmt)
        return
    now = utcnow()
    wide = fmt is OutputFormat.wide
    table = []
    for r in rows:
        run = r["last_run"]
        due = relative(r["next_due_at"], now) + (f" ({r['due_reason']})" if r["due_reason"] else "")
        row = [
            r["key"] + (" [admin]" if r.get("admin") else ""), r["provider"], state_text(r["stage"]), short_fp(r["current_fingerprint"]),
            relative(r["expires_at"], now) if r["expires_at"] else "-",
            due if r["next_due_at"] else "-",
            f"{run['state']} {relative(run['finished_at'] or run['updated_at'] or run['created_at'], now)}" if run else "-",
            run["id"] if run else "-",
        ]
        if wide:
            row += [r["credential_type"], r["owner"], short_fp(r["previous_fingerprint"]), r["vault"],
                    iso(r["last_rotated_at"])]
        table.append(row)
    columns = ["key", "provider", "stage", "current", "expires", "next due", "last run", "run id"]
    if wide:
        columns += ["type", "owner", "previous", "vault", "last rotated"]
    filtered = provider is not None or stage_filter is not None
    print_table(columns, table, wide=wide,
                empty="no managed keys match" if filtered else "no managed keys; load an inventory with `keyrotor config apply FILE`")
    for name, guard in sorted({(r["provider"], r["orphan_guard"]) for r in rows if r["orphan_guard"]}):
        typer.echo(f"provider {name}: {guard}")
    admins = [r["key"] for r in rows if r.get("admin")]
    if admins:
        typer.echo(f"[admin] ({', '.join(admins)}): these keys carry administrator rights at their provider; "
                   "whoever holds one acts as an administrator")
    unseeded = [r["key"] for r in rows if r["stage"] == "unseeded"]
    if unseeded:
        typer.echo(f"unseeded ({', '.join(unseeded)}): keyrotor has no current key on record; if the key exists "
                   "(at the provider and in Vault) run `keyrotor adopt KEY`, else `keyrotor rotate KEY` issues the first one")


def history(
    key: str = typer.Argument(..., help="Managed key name, as in the inventory."),
    limit: int = typer.Option(20, "--limit", min=1, help="How many of the most recent runs and audit events."),
    output: Optional[OutputFormat] = output_option(),
    json_out: bool = json_option(),
) -> None:
    """A key's runs and its audit trail (every state change, in order, with who caused it)."""
    from worker.cli.views import key_history

    fmt = pick_format(output, json_out)
    settings = cli_settings()
    engine = open_database(settings, read_only=True)
    with session_scope(engine) as session:
        doc = key_history(session, find_key(session, key), limit=limit)
    if fmt in (OutputFormat.json, OutputFormat.yaml):
        emit(doc, fmt)
        return
    wide = fmt is OutputFormat.wide
    print_runs(doc["runs"], title=f"runs of {key}", empty="no runs yet", wide=wide, with_key=False)
    typer.echo()
    print_events(doc["events"], wide=wide)
    typer.echo()
    print_table(["version", "stage", "fingerprint", "provider key id", "vault v", "issued", "retired"],
                [[v["id"], state_text(v["stage"]), short_fp(v["fingerprint"]) if not wide else v["fingerprint"],
                  v["provider_key_id"], v["vault_version"], iso(v["issued_at"]), iso(v["retired_at"])]
                 for v in doc["versions"]],
                title="credentials", empty="no credentials recorded", wide=wide)


def runs(
    state: Optional[str] = typer.Option(None, "--state", help="A run state (e.g. needs_attention), or open / terminal."),
    key: Optional[str] = typer.Option(None, "--key", help="Only this key's runs."),
    limit: int = typer.Option(50, "--limit", min=1, help="At most this many, newest first."),
    output: Optional[OutputFormat] = output_option(),
    json_out: bool = json_option(),
) -> None:
    """Rotation runs, newest first."""
    from worker.cli.views import list_runs, parse_state_filter

    fmt = pick_format(output, json_out)
    try:
        state_filter = parse_state_filter(state)
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)
    settings = cli_settings()
    engine = open_database(settings, read_only=True)
    with session_scope(engine) as session:
        key_row = find_key(session, key) if key else None
        rows = list_runs(session, state=state_filter, key=key_row, limit=limit)
    if fmt in (OutputFormat.json, OutputFormat.yaml):
        emit({"runs": rows}, fmt)
        return
    print_runs(rows, empty="no runs" + (f" in state {state_filter}" if state_filter else ""),
               wide=fmt is OutputFormat.wide)


def describe(
    run_id: str = typer.Argument(..., help="A run id, or an unambiguous prefix of one."),
    watch: bool = typer.Option(False, "--watch", "-w", help="Then narrate its changes until it ends or needs a person."),
    output: Optional[OutputFormat] = output_option(),
    json_out: bool = json_option(),
) -> None:
    """One run in full: its key, state, times, the whole last error, its audit trail and deliveries."""
    from worker.cli.views import describe_run

    fmt = pick_format(output, json_out)
    settings = cli_settings()
    engine = open_database(settings, read_only=True)
    with session_scope(engine) as session:
        doc = describe_run(session, find_run(session, run_id))
    if fmt in (OutputFormat.json, OutputFormat.yaml):
        emit(doc, fmt)
        return
    run, now = doc["run"], utcnow()
    fields: list[tuple[str, Any]] = [
        ("run", run["id"]), ("key", run["key"]), ("state", state_text(run["state"])), ("mode", run["mode"]),
        ("trigger", run["trigger"]), ("reason", run["reason"]), ("requested by", run["requested_by"]),
        ("emergency", "yes" if run["emergency"] else "no"), ("attempts", run["attempts"]),
        ("created", iso(run["created_at"])), ("updated", iso(run["updated_at"])),
        ("finished", iso(run["finished_at"])), ("duration", duration(run["duration_s"])),
        ("grace until", f"{iso(run['grace_until'])} ({relative(run['grace_until'], now)})" if run["grace_until"] else None),
        ("step deadline", iso(run["step_deadline_at"])), ("not before", iso(run["not_before"])),
    ]
    if run["target_credential_type"]:
        fields.append(("target type", run["target_credential_type"]))
    from worker.cli.output import console

    out = console()
    for name, value in fields:
        if value is None:
            continue
        out.print(f"{name + ':':<15}", state_text(value.plain) if hasattr(value, "plain") else value, sep="")
    if run["last_error"]:
        out.print("last error:")
        for line in str(run["last_error"]).splitlines() or [""]:
            out.print(f"  {line}")
    if doc["allowed_actions"]:
        out.print("resolve with:   " + ", ".join(f"keyrotor resolve {run['id']} --action {a}" for a in doc["allowed_actions"]))
    typer.echo()
    print_events(doc["events"], wide=fmt is OutputFormat.wide)
    if doc["sinks"]:
        typer.echo()
        print_table(["integration", "status", "fingerprint", "attempts", "updated", "error"],
                    [[d["integration"], state_text(d["status"]), short_fp(d["fingerprint"]), d["attempts"],
                      iso(d["updated_at"]), d["last_error"]] for d in doc["sinks"]],
                    title="deliveries", prose=["error"], wide=fmt is OutputFormat.wide)
    if watch:
        _watch(engine, run)


def _watch(engine: Any, run: dict[str, Any]) -> None:
    """Follow one run from now on (exit as ``rotate --wait``: 0 completed, 1 stopped otherwise)."""
    from worker.cli.act_cmds import WaitUntil, wait_for_runs
    from worker.cli.common import EXIT_INTERRUPTED

    typer.echo(f"\nwatching {run['id']} (Ctrl-C stops watching, not the run)")
    item = {"run_id": run["id"], "key": run["key"], "state": run["state"], "last_error": run["last_error"]}
    try:
        code = wait_for_runs(engine, [item], until=WaitUntil.completed, timeout=float("inf"), narrate=True)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED)
    raise typer.Exit(code)


def print_runs(rows: list[dict[str, Any]], *, title: str | None = None, empty: str, wide: bool,
               with_key: bool = True) -> None:
    """Runs as a table: full run ids, errors shortened with an ellipsis (``describe`` shows them whole)."""
    now = utcnow()
    columns = ["run id"] + (["key"] if with_key else []) + ["state", "trigger", "reason", "requested by", "created",
                                                             "updated", "duration", "error"]
    table = [[r["id"]] + ([r["key"]] if with_key else []) + [
        state_text(r["state"]), r["trigger"], r["reason"], r["requested_by"], iso(r["created_at"]),
        relative(r["updated_at"], now), duration(r["duration_s"]), r["last_error"]] for r in rows]
    print_table(columns, table, title=title, empty=empty, prose=["reason", "error"], wide=wide)


def print_events(events: list[dict[str, Any]], *, wide: bool) -> None:
    print_table(["at", "run", "actor", "event", "transition", "detail"],
                [[iso(e["at"]), e["run_id"] or "-", e["actor"], e["event"], _transition(e), _detail(e["detail"])]
                 for e in events],
                title="audit trail", empty="no audit events", prose=["detail"], wide=wide)


def _transition(event: dict[str, Any]) -> str:
    if event["from_state"] or event["to_state"]:
        return f"{event['from_state'] or '-'} → {event['to_state'] or '-'}"
    return "-"


def _detail(detail: dict[str, Any]) -> str:
    """``name=value`` pairs; structured values as compact JSON (never Python reprs)."""
    parts = []
    for name, value in detail.items():
        if isinstance(value, str) and value.startswith("sha256:"):
            value = short_fp(value)
        elif not isinstance(value, str):
            value = json.dumps(value, separators=(",", ":"), default=str)
        parts.append(f"{name}={value}")
    return clip(" ".join(parts), 10_000)


def register(app: typer.Typer) -> None:
    app.command("status")(status)
    app.command("history")(history)
    app.command("runs")(runs)
    app.command("describe")(describe)
    app.command("show", help="Same as `describe`.")(describe)
    from worker.cli import act_cmds, adopt_cmd, worker_cmd

    act_cmds.register(app)
    adopt_cmd.register(app)
    worker_cmd.register(app)
