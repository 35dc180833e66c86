"""``keyrotor ping``: reach the database, Redis and Vault (with a login) from where this runs."""

from __future__ import annotations

import typer

from worker.cli.common import EXIT_FAILED, cli_settings
from worker.cli.output import print_json

# Commands import the service modules they use inside the command function, not here:
# `keyrotor --help` and each command start without importing the whole service (start-up cost).


def ping(
    timeout: float = typer.Option(5.0, "--timeout", min=0.1, help="Seconds to wait for each of the database and Redis."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Check that the database, Redis and Vault answer (Vault: log in); exit 1 if any does not."""
    from worker.connectivity import check_all

    checks = check_all(cli_settings(), timeout)
    if json_out:
        print_json({"ok": all(c.ok for c in checks), "checks": [c.as_dict() for c in checks]})
    else:
        for c in checks:
            typer.echo(f"{c.name:<9} {'ok' if c.ok else 'FAILED':<7} {c.detail}")
    if not all(c.ok for c in checks):
        raise typer.Exit(EXIT_FAILED)


def register(app: typer.Typer) -> None:
    app.command("ping")(ping)
