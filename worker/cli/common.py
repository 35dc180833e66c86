"""What every operator command needs: settings, logging to stderr, a database whose schema is
current, and user errors that print one line and exit with a meaningful code (no traceback).

Exit codes (all operator commands; the table in README.md and `keyrotor --help`):
    0 ok · 1 the operation failed, or a service it needs (database, Redis, Vault, a worker) did not
    answer · 2 usage or configuration error: bad arguments, an unknown key or run, a database schema
    older than this release (run `keyrotor db upgrade`), no database file · 3 timed out waiting ·
    130 interrupted (Ctrl-C; a requested run continues in the workers)
"""

from __future__ import annotations

import contextlib
import errno
import getpass
import os
import socket
import sys
import time
from typing import Callable, Iterator, NoReturn, Optional, TypeVar
from urllib.parse import urlparse

import typer
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, col, select

from worker.db.migrate import ensure_current
from worker.db.models import ManagedKey, RotationRun
from worker.db.session import engine_for
from worker.log import configure_logging
from worker.settings import Settings, get_settings
from worker.urls import display_url

# Commands import the service modules they use inside the command function, not here:
# `keyrotor --help` and each command start without importing the whole service (start-up cost).

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3
EXIT_INTERRUPTED = 130

#: ``keyrotor -v`` (INFO) / ``-vv`` (DEBUG); commands otherwise log warnings and errors only.
_verbosity = 0


def set_verbosity(count: int) -> None:
    global _verbosity
    _verbosity = count


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print ``keyrotor: error: MESSAGE`` on stderr and exit with ``code``."""
    typer.echo(f"keyrotor: error: {message}", err=True)
    raise typer.Exit(code)


def cli_settings() -> Settings:
    """Settings, with logs sent to stderr so stdout carries only tables or one JSON document."""
    settings = get_settings()
    configure_logging(cli_log_level(settings), settings.log_format, stream=sys.stderr)
    return settings


def cli_log_level(settings: Settings) -> str:
    """An operator at a terminal wants the answer, not the service's INFO chatter: warnings and up
    unless ``-v``/``-vv`` ask for more. KEYROTOR_LOG_LEVEL (set for the services in a pod) may
    only ask for less, so ``kubectl exec … keyrotor status`` prints no log line between rows."""
    if _verbosity:
        return "DEBUG" if _verbosity > 1 else "INFO"
    return "ERROR" if settings.log_level == "ERROR" else "WARNING"


def open_database(settings: Settings, *, read_only: bool = False) -> Engine:
    """The engine for KEYROTOR_DATABASE_URL once its schema is this release's (``ensure_current``:
    behind → ``SchemaBehind``, exit 2; ahead → a warning; SQLite upgrades itself).

    ``read_only`` commands never create a SQLite file: a missing one is a usage error (exit 2)."""
    if read_only:
        missing = missing_sqlite_file(settings.database_url)
        if missing:
            fail(f"no database at {missing}: set KEYROTOR_DATABASE_URL to the database keyrotor uses "
                 "(e.g. postgresql://user@host/keyrotor), or create this one with `keyrotor db upgrade`")
    engine = engine_for(settings.database_url)
    ensure_current(engine)
    return engine


_T = TypeVar("_T")

#: A service's start-up checks try this often when the database drops a connection mid-check.
START_UP_ATTEMPTS = 3


def retried_if_dropped(check: Callable[[], _T], *, attempts: int = START_UP_ATTEMPTS, pause_s: float = 1.0) -> _T:
    """Run a service's start-up database check again when the server dropped an established
    connection in the middle of it (a restart, a failover, a terminated backend): it answered a
    moment ago, so another try usually works, where exiting costs the service a restart. A server
    that does not answer at all (refused, unknown host, bad login) fails at once, as before."""
    for attempt in range(1, attempts + 1):
        try:
            return check()
        except OperationalError as exc:
            if not exc.connection_invalidated or attempt == attempts:
                raise
            time.sleep(pause_s)
    raise AssertionError("unreachable")  # pragma: no cover


def missing_sqlite_file(url: str) -> str | None:
    """The path of a SQLite database file that does not exist (None for any other URL)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    path = parsed.database
    if parsed.get_backend_name() != "sqlite" or not path or path == ":memory:" or path.startswith("file:"):
        return None
    return None if os.path.exists(path) else path


def find_run(session: Session, run_id: str, missing: Optional[str] = None) -> RotationRun:
    """The run with this id, or with this unambiguous prefix of an id (usage error otherwise;
    ``missing`` replaces the message when nothing matches)."""
    text = run_id.strip().lower()
    run = session.get(RotationRun, text) if text else None
    if run is not None:
        return run
    matches = session.exec(select(RotationRun).where(col(RotationRun.id).startswith(text, autoescape=True))
                           .order_by(col(RotationRun.created_at).desc()).limit(6)).all() if text else []
    if not matches:
        fail(missing or f"no run {run_id!r}; list runs with `keyrotor runs`")
    if len(matches) > 1:
        shown = ", ".join(m.id for m in matches[:5]) + (", …" if len(matches) > 5 else "")
        fail(f"run id prefix {run_id!r} is ambiguous: {shown}; give more characters")
    return matches[0]


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


def serve_metrics(settings: Settings, role: str) -> int:
    """Start /metrics and /healthz on the role's port (0: off). A port in use is one line naming
    the setting to change (exit 2), not a traceback."""
    from worker.metrics import start_metrics_server

    port = settings.metrics_port_for(role)
    if not port:
        return 0
    with port_in_use_fails(port, f"(another keyrotor {role} on this host?); set KEYROTOR_METRICS_PORT to a free "
                                 "port, or 0 to turn metrics off"):
        return start_metrics_server(port)


@contextlib.contextmanager
def port_in_use_fails(port: int, advice: str) -> Iterator[None]:
    """Turn "address already in use" while binding ``port`` into one line with ``advice`` (exit 2)."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        fail(f"port {port} is already in use {advice}")


def masked_database_url(url: str) -> str:
    """The database URL with its password masked (for start-up lines and messages)."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
