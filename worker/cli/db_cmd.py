"""``keyrotor db``: schema migrations (Alembic)."""

from __future__ import annotations

import typer

from worker.db.migrate import upgrade
from worker.settings import get_settings

app = typer.Typer(no_args_is_help=True)


@app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Apply migrations up to REVISION (default: head) on KEYROTOR_DATABASE_URL."""
    settings = get_settings()
    upgrade(settings.database_url, revision)
    typer.echo(f"database at revision {revision}")
