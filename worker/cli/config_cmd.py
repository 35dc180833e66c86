"""``keyrotor config check FILE [--resolve]`` and ``keyrotor config apply FILE [--prune] [--dry-run]``.

``check`` prints every problem as ``FILE:LINE: field.path: message`` and exits 2; it never shows
a traceback. With ``--resolve`` it also resolves every secret reference (env and Vault) and
checks that the database, Redis and Vault answer (``database: …`` lines). ``apply`` syncs the
inventory into the database, whose schema must be current (``keyrotor db upgrade`` first; an
SQLite file upgrades itself).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from worker.errors import ConfigError
from worker.inventory.loader import InventoryError, Problem, check_file, locate_in_file, problems_json
from worker.inventory.schema import Inventory

# Commands import the service modules they use inside the command function, not here:
# `keyrotor --help` and each command start without importing the whole service (start-up cost).

app = typer.Typer(no_args_is_help=True)


def inventory_file(file: Optional[Path]) -> Path:
    """The FILE argument or ``$KEYROTOR_CONFIG``. Checked here rather than left to click, whose
    handling of a missing required argument with an environment fallback differs across the
    typer/click versions keyrotor allows (one passed None into the command)."""
    if file is None:
        raise ConfigError("no inventory file: give the FILE argument (e.g. config/keyrotor.example.yaml) "
                          "or set KEYROTOR_CONFIG")
    return file

EXIT_INVALID = 2


@app.command("check")
def check(
    file: Optional[Path] = typer.Argument(None, envvar="KEYROTOR_CONFIG", show_envvar=True, help="Inventory YAML file [default: $KEYROTOR_CONFIG]."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    resolve: bool = typer.Option(False, "--resolve", help="Also resolve every secret reference and check that the "
                                 "database, Redis and Vault answer (uses the KEYROTOR_*/VAULT_* settings)."),
) -> None:
    """Validate an inventory file; print each problem with its FILE:LINE and field path."""
    file = inventory_file(file)
    inventory, problems = check_file(file)
    if resolve:
        problems = problems + _live_problems(file, inventory)
    if as_json:
        typer.echo(json.dumps({
            "ok": not problems,
            "file": str(file),
            "summary": inventory.summary() if inventory else None,
            "problems": json.loads(problems_json(problems)),
        }, indent=2))
    elif problems:
        for problem in problems:
            typer.echo(problem.format(), err=True)
        typer.echo(f"{len(problems)} problem{'s' if len(problems) != 1 else ''} in {file}", err=True)
    else:
        assert inventory is not None
        checked = "; every secret reference resolves; the database, Redis and Vault answer" if resolve else ""
        typer.echo(f"ok: {inventory.summary()}{checked}")
    if problems:
        raise typer.Exit(EXIT_INVALID)


def _live_problems(file: Path, inventory: Inventory | None) -> list[Problem]:
    """Secret references that do not resolve (at their FILE:LINE), then unreachable services."""
    from worker.cli.common import cli_settings
    from worker.doctor import reference_problems, resolver_for, service_problems, vault_for

    settings = cli_settings()
    store, vault_problem = vault_for(settings)
    found: list[Problem] = []
    if inventory is not None:
        refs = reference_problems(inventory.model_dump(mode="json", by_alias=True), resolver_for(store, vault_problem))
        where = locate_in_file(file, [loc for loc, _ in refs])
        found += [Problem(line, path, message, str(file)) for (line, path), (_, message) in zip(where, refs)]
    found += [Problem(0, p.service, p.message) for p in service_problems(settings, vault_problem)]
    return found


@app.command("apply")
def apply(
    file: Optional[Path] = typer.Argument(None, envvar="KEYROTOR_CONFIG", show_envvar=True, help="Inventory YAML file [default: $KEYROTOR_CONFIG]."),
    prune: bool = typer.Option(False, "--prune", help="Delete providers, integrations and keys that are no longer declared."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would change; write nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    resolve: bool = typer.Option(False, "--resolve", help="Refuse to apply unless every secret reference resolves "
                                 "and the database, Redis and Vault answer (as `config check --resolve`)."),
) -> None:
    """Sync the inventory into the database (idempotent; removes nothing without --prune)."""
    file = inventory_file(file)
    from worker.db.migrate import ensure_current
    from worker.db.session import make_engine, session_scope
    from worker.cli.common import cli_settings
    from worker.inventory.apply import apply_inventory, default_actor

    inventory, problems = check_file(file)
    if resolve and not problems:
        problems = _live_problems(file, inventory)
    if problems or inventory is None:
        if as_json:  # a script asked for JSON: the refusal is a document too (exit 2 all the same)
            typer.echo(json.dumps({"applied": False, "file": str(file),
                                   "problems": json.loads(problems_json(problems))}, indent=2))
        else:
            for problem in problems:
                typer.echo(problem.format(), err=True)
            typer.echo(f"not applied: {len(problems)} problem{'s' if len(problems) != 1 else ''} in {file}", err=True)
        raise typer.Exit(EXIT_INVALID)

    settings = cli_settings()  # logs (a schema-ahead warning) to stderr: stdout is the report
    engine = make_engine(settings.database_url)
    try:
        ensure_current(engine)
        with session_scope(engine) as session:
            report = apply_inventory(session, inventory, prune=prune, dry_run=dry_run,
                                     actor=default_actor(), source=str(file))
            if dry_run:
                session.rollback()
    finally:
        engine.dispose()

    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
        return
    prefix = "dry run: " if dry_run else ""
    typer.echo(f"{prefix}applied {file} ({inventory.summary()})" if not dry_run else f"{prefix}{file} ({inventory.summary()})")
    for name, fields in sorted(report.updated_fields.items()):
        typer.echo(f"  updated {name}: {', '.join(fields)}")
    for line in report.summary_lines():
        typer.echo(line)


__all__ = ["app", "InventoryError"]
