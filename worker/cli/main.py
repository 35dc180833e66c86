"""``keyrotor``: the single entry point. Each command group lives in its own module.

Errors a user can cause (bad settings, bad inventory, bad arguments) print one line on stderr and
exit 2, with no traceback; a failed operation or a service that does not answer exits 1 (the
table is EXIT_CODES below, shown by ``keyrotor --help`` and in README.md).
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

import typer
from sqlalchemy.exc import OperationalError

from worker import __version__
from worker.errors import ConfigError, KeyrotorError
from worker.settings import get_settings

# Commands import the service modules they use inside the command function, not here:
# `keyrotor --help` and each command start without importing the whole service (start-up cost).

#: The exit codes of every command (README.md carries the same table).
EXIT_CODES = (
    (0, "ok"),
    (1, "the operation failed, or a service it needs (database, Redis, Vault, a worker) did not answer"),
    (2, "usage or configuration error: bad arguments or settings, unknown key or run, ambiguous run-id "
        "prefix, no database file, schema older than this release (run `keyrotor db upgrade`)"),
    (3, "timed out waiting (rotate --wait)"),
    (130, "interrupted (Ctrl-C); a requested run continues in the workers"),
)

app = typer.Typer(
    name="keyrotor",
    help="Rotate API keys: issue at the provider, store in Vault, propagate, verify, retire.",
    epilog="Exit codes: " + " · ".join(f"{code} {text}" for code, text in EXIT_CODES)
    + ". Output: -o table|wide|json|yaml on read commands; colour only on a terminal, never with NO_COLOR or --no-color.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    # Plain click help: typer's rich panels print flags as `--json <bool>`, as if they took a value.
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"keyrotor {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    no_color: bool = typer.Option(False, "--no-color", help="No colour (also: NO_COLOR set, or stdout not a terminal)."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="Log INFO (-v) or DEBUG (-vv) lines on stderr."),
) -> None:
    """keyrotor command line."""
    from worker.cli.common import set_verbosity
    from worker.cli.output import disable_colour

    if no_color:
        disable_colour()
    set_verbosity(verbose)


def _register() -> None:
    # Imported here so `keyrotor --help` stays fast and one broken group cannot hide the others.
    from worker.cli import config_cmd, db_cmd, demo_cmd, plan_cmd, run_cmds, sandbox_cmd

    app.add_typer(config_cmd.app, name="config", help="Check and apply the inventory (providers, keys, integrations).")
    app.add_typer(db_cmd.app, name="db", help="Database schema migrations.")
    app.add_typer(sandbox_cmd.app, name="sandbox", help="Local provider and consumer stand-ins (demo and tests).")
    run_cmds.register(app)
    demo_cmd.register(app)
    from worker.cli import ping_cmd

    ping_cmd.register(app)
    plan_cmd.register(app)
    # Command groups of packages above worker/ (the scheduler process in jobs/) register through
    # the `keyrotor.commands` entry point (pyproject.toml): worker/ never imports them.
    for entry in entry_points(group="keyrotor.commands"):
        entry.load()(app)


def main(argv: list[str] | None = None) -> int:
    _register()
    try:
        # Without standalone mode, click *returns* the code of a `raise typer.Exit(n)` instead of raising.
        result = app(args=argv, prog_name="keyrotor", standalone_mode=False)
        if isinstance(result, int):
            return result
    except ConfigError as exc:
        typer.echo(f"keyrotor: error: {exc}", err=True)
        return 2
    except KeyrotorError as exc:
        typer.echo(f"keyrotor: {type(exc).__name__}: {exc}", err=True)
        return 1
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except typer.Abort:
        typer.echo("Aborted.", err=True)
        return 130
    except KeyboardInterrupt:
        return 130
    except SystemExit as exc:  # typer's --show-completion / --install-completion end with sys.exit
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except OperationalError as exc:  # the database does not answer (down, wrong host/port, bad login)
        typer.echo(f"keyrotor: error: {_database_unreachable(exc)}", err=True)
        return 1  # like Redis: a service that did not answer, not a usage error
    except Exception as exc:
        # Click usage errors carry their own message and exit code. Recent typer vendors click
        # (typer._click), so the class is recognised by its methods, not by importing click.
        show, exit_code = getattr(exc, "show", None), getattr(exc, "exit_code", None)
        if callable(show) and isinstance(exit_code, int):
            show()
            return exit_code
        raise
    return 0


def _database_unreachable(exc: OperationalError) -> str:
    """One line naming the database (password masked) and the driver's reason."""
    from sqlalchemy.engine import make_url

    try:
        where = make_url(get_settings().database_url).render_as_string(hide_password=True)
    except Exception:  # settings themselves unreadable: say so without a URL
        where = "KEYROTOR_DATABASE_URL"
    reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else type(exc).__name__
    return f"the database at {where} does not answer ({reason}); check KEYROTOR_DATABASE_URL and that the server is up"


if __name__ == "__main__":
    sys.exit(main())
