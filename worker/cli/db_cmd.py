"""``keyrotor db``: schema migrations (Alembic).

``db upgrade`` is the only command that migrates a PostgreSQL database (the Helm chart runs it as
a pre-install/pre-upgrade hook Job); concurrent runs wait for each other on an advisory lock.
"""

from __future__ import annotations

import typer

from worker.cli.common import cli_settings, fail
from worker.db.migrate import alembic_config, schema_status, upgrade
from worker.db.session import make_engine

app = typer.Typer(no_args_is_help=True)


@app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Apply migrations up to REVISION (default: head) on KEYROTOR_DATABASE_URL."""
    settings = cli_settings()
    _check_revision(revision)
    engine = make_engine(settings.database_url)
    try:
        before = schema_status(engine)
        if before.state == "ahead" and revision == "head":
            # A newer release migrated this database and this (older) image came back, e.g. a
            # `helm upgrade` to an earlier chart version: nothing to apply, and nothing to undo.
            typer.echo(f"database at revision {before.revision_text}, newer than this release's head "
                       f"{before.head}: nothing to do (a newer keyrotor migrated it)")
            return
        upgrade(settings.database_url, revision)
        typer.echo(f"database at revision {schema_status(engine).revision_text}")
    finally:
        engine.dispose()


def _check_revision(revision: str) -> None:
    """A revision this release does not know is a usage error (one line), found before connecting."""
    from alembic.script import ScriptDirectory
    from alembic.util.exc import CommandError

    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    try:
        script.get_revisions(revision)
    except (CommandError, KeyError, ValueError) as exc:  # alembic's own errors for unknown / ambiguous ids
        known = [r.revision for r in script.walk_revisions()]
        fail(f"unknown revision {revision!r} ({str(exc).splitlines()[0]}); give `head` or one of: {', '.join(known)}")
