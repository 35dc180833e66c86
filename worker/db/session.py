"""Engine and session helpers, shared by the CLI, the workers and the scheduler."""

from __future__ import annotations

import time
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Callable, Iterator

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session as OrmSession
from sqlmodel import Session, create_engine
from worker.settings import get_settings


def make_engine(url: str, **kwargs: object) -> Engine:
    """Create an engine; SQLite gets WAL, a busy timeout and foreign keys (workers share the file)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            if ":memory:" not in url:
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "savepoint")
        def _sqlite_begin_before_savepoint(conn, _name):
            # pysqlite (Python < 3.12, "legacy" transaction control) begins a transaction only
            # before INSERT/UPDATE/DELETE and knows nothing of SAVEPOINT. A ``begin_nested()``
            # before the session's first write would make the SAVEPOINT itself open the SQLite
            # transaction, and its RELEASE would then *commit* everything so far on its own — a
            # rotation run committed before its audit event, kept even if the caller rolls back.
            # Begin the real transaction first so the SAVEPOINT nests inside it.
            dbapi_conn = conn.connection.dbapi_connection
            if dbapi_conn is not None and not dbapi_conn.in_transaction:
                dbapi_conn.execute("BEGIN")

        return engine
    engine = create_engine(url, **{**postgres_engine_options(kwargs.get("poolclass") is None), **kwargs})
    ping_idle_connections(engine, get_settings().db_ping_idle_s)
    return engine


_RETURNED_AT = "keyrotor_returned_at"


def ping_idle_connections(engine: Engine, idle_s: float) -> None:
    """Ping a pooled connection before use only when it sat in the pool at least ``idle_s``
    (SQLAlchemy's ``pool_pre_ping`` pings before *every* checkout: a round trip per transaction,
    a fifth of a busy worker's round trips to PostgreSQL). Idle connections are the ones a restarted server, a
    proxy's idle timeout or PgBouncer take away; one that dies while in constant use fails its
    statement, SQLAlchemy then recycles the whole pool, and the step is retried."""

    @event.listens_for(engine, "checkin")
    def _returned(_dbapi_conn: Any, record: Any) -> None:
        record.info[_RETURNED_AT] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        returned_at = record.info.get(_RETURNED_AT)  # None: connected just now
        if returned_at is None or time.monotonic() - returned_at < idle_s:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:
            # The pool discards this connection and checks out another (a fresh one if need be).
            raise DisconnectionError(f"pooled connection idle {time.monotonic() - returned_at:.0f}s is dead") from exc
        if not alive:  # pragma: no cover - psycopg's ping raises rather than answer False
            raise DisconnectionError("pooled connection did not answer a ping")


def postgres_engine_options(pooled: bool = True, settings: Any = None) -> dict[str, Any]:
    """Pool sizing and connection options of a PostgreSQL engine from the settings
    (``KEYROTOR_DB_*``). ``pooled=False`` for a caller that brings its own pool class (NullPool
    takes no size arguments). See docs/scaling.md for the connection arithmetic."""
    if settings is None:
        settings = get_settings()
    connect_args: dict[str, Any] = {"application_name": settings.db_application_name}
    if not settings.db_prepared_statements:
        # PgBouncer in transaction pooling mode hands each transaction any server connection: a
        # statement prepared on one is unknown on the next. psycopg 3 then must never prepare.
        connect_args["prepare_threshold"] = None
    options: dict[str, Any] = {"connect_args": connect_args}
    if pooled:
        options.update(pool_size=settings.db_pool_size, max_overflow=settings.db_max_overflow,
                       pool_timeout=settings.db_pool_timeout_s, pool_recycle=settings.db_pool_recycle_s)
    return options


@lru_cache(maxsize=8)
def engine_for(url: str) -> Engine:
    """One engine (and pool) per URL per process."""
    return make_engine(url)


_AFTER_COMMIT = "keyrotor_after_commit"


def after_commit(session: Session, callback: Callable[[], None]) -> None:
    """Call ``callback`` once ``session``'s transaction commits; forgotten if it rolls back.

    What must happen only for a committed change (sending a message, counting an outcome) goes
    through here. Callbacks run in the order given; each must handle its own errors.
    """
    session.info.setdefault(_AFTER_COMMIT, []).append(callback)


# Listeners on the Session class, registered once: listening on each session instance that has a
# callback cost more than the transaction's statements.
@event.listens_for(OrmSession, "after_commit")
def _run_after_commit(session: OrmSession) -> None:
    todo = session.info.pop(_AFTER_COMMIT, None)
    for call in todo or ():
        call()


@event.listens_for(OrmSession, "after_soft_rollback")
def _forget_after_commit(session: OrmSession, _transaction: Any) -> None:
    session.info.pop(_AFTER_COMMIT, None)


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


@contextmanager
def statement_scope(engine: Engine) -> Iterator[Connection]:
    """A pooled connection, without an ORM session, for a durable point sent as one statement (a
    step's transition with its rows, the claim of its lease: ``worker/pipeline/runs.py``).

    On PostgreSQL the connection is in autocommit: no BEGIN and no COMMIT, one round trip instead
    of three, and the statement is committed when it returns (it is atomic by itself). A second
    statement would commit on its own: send one only where there is none. Elsewhere (SQLite, where
    a transition's rows go one statement after another) a transaction, committed on success. A
    ``Session`` around the statement cost more CPU than the statement (docs/performance.md,
    thirteenth round)."""
    if engine.dialect.name != "postgresql":
        with engine.begin() as connection:
            yield connection
        return
    with engine.connect() as connection:
        # Local to psycopg (no round trip); the pool resets it when the connection returns.
        connection.execution_options(isolation_level="AUTOCOMMIT")
        # No ``connection.begin()``: in autocommit it reaches no server, and its bookkeeping cost a
        # fifth of this scope's CPU. A direct statement (worker/db/direct.py) begins nothing either.
        yield connection


#: Run in a child process by ``read_files_safely``: print each file's bytes, length-prefixed.
_READER = """
import os, struct, sys
out = sys.stdout.buffer
for path in sys.argv[1:]:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        out.write(struct.pack(">q", -1))
        continue
    out.write(struct.pack(">q", len(data)))
    out.write(data)
"""


def read_files_safely(paths: "list[str] | tuple[str, ...]") -> dict[str, bytes | None]:
    """The bytes of files that SQLite connections of *this* process may have open (the database,
    its -wal and -shm), read in a child process; ``None`` for a missing file.

    Opening and closing such a file here would drop every POSIX advisory lock this process holds
    on it (fcntl locks are per process and released by *any* close of the file). SQLite then
    believes this process has let go: another process's last connection checkpoints and deletes
    the WAL and -shm, and this process's connections keep reading the deleted ones, never seeing
    that process's commits again (and losing their own). See "How To Corrupt An SQLite Database
    File", section 2.2. A leak scan of the database files (the demo's) must go through here.
    """
    import struct
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _READER, *map(str, paths)], capture_output=True, check=True,
                          timeout=60)
    blob, offset = done.stdout, 0
    result: dict[str, bytes | None] = {}
    for path in paths:
        (size,) = struct.unpack_from(">q", blob, offset)
        offset += 8
        if size < 0:
            result[str(path)] = None
            continue
        result[str(path)] = blob[offset:offset + size]
        offset += size
    return result
