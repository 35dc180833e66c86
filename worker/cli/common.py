"""What every operator command needs: settings, logging to stderr, a database whose schema is
current, and user errors that print one line and exit with a meaningful code (no traceback).

Exit codes (all operator commands):
    0 ok · 1 the operation failed · 2 usage or configuration error (a database schema older than
    this release included: run `keyrotor db upgrade`) · 3 timed out waiting
"""

from __future__ import annotations

import getpass
import os
import socket
import sys
from typing import NoReturn
from urllib.parse import urlparse

import typer
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from worker.db.migrate import ensure_current
from worker.db.models import ManagedKey
from worker.db.session import engine_for
from worker.log import configure_logging
from worker.settings import Settings, get_settings
from worker.urls import display_url

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print ``keyrotor: error: MESSAGE`` on stderr and exit with ``code``."""
    typer.echo(f"keyrotor: error: {message}", err=True)
    raise typer.Exit(code)


def cli_settings() -> Settings:
    """Settings, with logs sent to stderr so stdout carries only tables or one JSON document."""
    settings = get_settings()
    # An operator at a terminal wants the answer, not the service's INFO chatter: warnings and up
    # unless KEYROTOR_LOG_LEVEL asks for more.
    level = settings.log_level if "KEYROTOR_LOG_LEVEL" in os.environ else "WARNING"
    configure_logging(level, settings.log_format, stream=sys.stderr)
    return settings


def open_database(settings: Settings) -> Engine:
    """The engine for KEYROTOR_DATABASE_URL once its schema is this release's (``ensure_current``:
    behind → ``SchemaBehind``, exit 2; ahead → a warning; SQLite upgrades itself)."""
    engine = engine_for(settings.database_url)
    ensure_current(engine)
    return engine


def find_key(session: Session, name: str) -> ManagedKey:
    key = session.exec(select(ManagedKey).where(ManagedKey.name == name)).first()
    if key is None:
        fail(f"no managed key named {name!r}; see `keyrotor status`")
    return key


def operator() -> str:
    """Who is at the keyboard, for the audit trail (``cli:<user>``)."""
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in a container
        user = os.environ.get("USER") or f"uid{os.getuid()}"
    return f"cli:{user}"


def operator_at_host() -> str:
    """``cli:<user>@<host>``: the OS user and host, for actions a person takes on a keyrotor host
    (weak evidence: whoever holds the service's credentials there; see docs/assisted-rotation.md)."""
    return f"{operator()}@{socket.gethostname()}"


def redis_reachable(url: str, timeout: float = 0.5) -> bool:
    """True when something answers PING at ``url`` (the demo then uses the Redis broker)."""
    from worker.redis_conn import redis_client

    parsed = urlparse(url)
    try:
        if parsed.scheme in ("redis", "rediss"):  # fail fast, before redis-py's retries with backoff
            with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 6379), timeout=timeout):
                pass
        client = redis_client(url, socket_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def require_redis(url: str, consequence: str = "") -> None:
    """Exit 1 with one line (password masked) when nothing answers PING at ``url``."""
    if not redis_reachable(url, timeout=2.0):
        fail(f"Redis at {display_url(url)} does not answer{consequence}; check KEYROTOR_REDIS_URL", EXIT_FAILED)
