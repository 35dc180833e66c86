"""Hot statements sent on the session's psycopg connection, past SQLAlchemy's execution machinery.

A step's durable points are a handful of statements built once (``worker/pipeline/runs.py``,
``steps/common.py``). Through the ORM, a transition that hands the run to the chain's next step
cost about 0.8 ms of CPU, through Core 0.4 ms, and sent here 0.25 ms, on the same statement and
server (docs/performance.md, eleventh round). What SQLAlchemy does around a statement, kept here:

- the SQL is its compilation for the engine's dialect, once per statement shape (under a lock: a
  statement's first compile is not safe in two threads at once, worker/db/statements.py); the
  compiled text is then shared by every thread;
- bound values go through the types' bind processors (a JSON column's value, say), results
  through their result processors, both taken from the statement's own types;
- it runs on the session's connection, in its transaction (or on a connection of its own in
  autocommit, ``statement_scope``), and the ``before_cursor_execute`` and ``after_cursor_execute``
  listeners still see it (tests count a step's statements with them);
- a driver error is raised as SQLAlchemy's ``DBAPIError`` (``OperationalError``, ``IntegrityError``
  …), and a lost connection is invalidated, so the pool never hands it out again.

Rows come back as tuples; a ``Loader`` turns a slice of one into a mapped object the way
``Session.merge(load=False)`` builds one (persistent identity, clean), without the ORM's loading
machinery. Only for PostgreSQL (psycopg); other dialects take SQLAlchemy's own path.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Hashable, Mapping, Optional, Sequence

from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session as OrmSession, class_mapper
from sqlalchemy.orm.attributes import instance_state
from sqlmodel import Session


class DirectStatement:
    """A statement compiled once for ``dialect``: its SQL text, the bind processors of its
    parameters and the result processors of its columns."""

    def __init__(self, statement: Any, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        if getattr(compiled, "escaped_bind_names", None) or compiled.post_compile_params:
            # Escaped names and values rendered at execution (``in_([...])``) are SQLAlchemy's to fill in.
            raise ValueError("a direct statement takes plain bind parameters only (no `in_` list, no escaped names)")
        self.sql: str = compiled.string
        self._bind: dict[str, Callable[[Any], Any]] = {}
        #: Values the statement carries itself (``literal(1)``); the caller's bind the rest.
        self._fixed: dict[str, Any] = {}
        for name, bind in compiled.binds.items():
            name = compiled.bind_names.get(bind, name)
            if not bind.required:
                self._fixed[name] = bind.effective_value
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                self._bind[name] = processor
        columns = list(statement.exported_columns)  # a SELECT's columns, or a write's RETURNING
        processors = [column.type.dialect_impl(dialect).result_processor(dialect, None) for column in columns]
        self._result: Optional[list[Optional[Callable[[Any], Any]]]] = (
            processors if any(p is not None for p in processors) else None)

    def parameters(self, values: Mapping[str, Any]) -> dict[str, Any]:
        params = {**self._fixed, **values} if self._fixed else dict(values)
        for name, process in self._bind.items():
            if name in params:
                params[name] = process(params[name])
        return params

    def row(self, values: Sequence[Any]) -> tuple[Any, ...]:
        if self._result is None:
            return tuple(values)
        return tuple(value if process is None else process(value) for process, value in zip(self._result, values))


class DirectStatements:
    """Direct statements by shape, compiled on first use and shared by every thread."""

    def __init__(self) -> None:
        self._built: dict[Hashable, DirectStatement] = {}
        self._lock = threading.Lock()

    def get(self, shape: Hashable, dialect: Dialect, build: Callable[[], Any]) -> DirectStatement:
        key = (dialect.name, shape)
        direct = self._built.get(key)
        if direct is None:
            with self._lock:
                direct = self._built.get(key)
                if direct is None:
                    direct = self._built[key] = DirectStatement(build(), dialect)
        return direct

    def clear(self) -> None:
        """Forget every compiled statement (a test that wants each use to be a first compile)."""
        with self._lock:
            self._built.clear()


def dialect_of(bind: "Session | Engine | Connection") -> Dialect:
    """The dialect of ``bind``: a session's (its engine's), an engine's or a connection's."""
    return (bind.get_bind() if isinstance(bind, OrmSession) else bind).dialect


def connection_of(bind: "Session | Connection") -> Connection:
    """The connection ``bind`` runs on: a session's (in its transaction), or ``bind`` itself."""
    return bind.connection() if isinstance(bind, OrmSession) else bind


def usable(bind: "Session | Engine | Connection") -> bool:
    """Whether the database of ``bind`` (a session, an engine or a connection) takes direct
    statements (PostgreSQL through psycopg)."""
    dialect = dialect_of(bind)
    return dialect.name == "postgresql" and dialect.driver == "psycopg"


def execute(bind: "Session | Connection", direct: DirectStatement, values: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    """Run ``direct`` on ``bind`` (a session's connection, in its transaction, or a connection)
    and return its rows (a direct statement always returns rows: a SELECT, or a write with
    RETURNING)."""
    connection = connection_of(bind)
    params = direct.parameters(values)
    fairy = connection.connection
    cursor = fairy.cursor()
    try:
        if connection.dispatch.before_cursor_execute:
            connection.dispatch.before_cursor_execute(connection, cursor, direct.sql, params, None, False)
        cursor.execute(direct.sql, params)
        if connection.dispatch.after_cursor_execute:
            connection.dispatch.after_cursor_execute(connection, cursor, direct.sql, params, None, False)
        rows = cursor.fetchall()  # every direct statement returns rows (a SELECT, or RETURNING)
    except connection.dialect.loaded_dbapi.Error as exc:
        lost = connection.dialect.is_disconnect(exc, fairy.dbapi_connection, cursor)
        if lost:
            connection.invalidate(exc)
        raise DBAPIError.instance(direct.sql, params, exc, connection.dialect.loaded_dbapi.Error,
                                  connection_invalidated=lost, dialect=connection.dialect) from exc
    finally:
        cursor.close()
    return [direct.row(row) for row in rows]


def fetch(session: Session, statements: DirectStatements, shape: Hashable, build: Callable[[], Any],
          values: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    """The rows of the statement ``build`` makes, with ``values``: sent directly where the
    database takes it, else through SQLAlchemy (SQLite), on ``session``'s connection either way."""
    if usable(session):
        return execute(session, statements.get(shape, session.get_bind().dialect, build), values)
    return [tuple(row) for row in session.connection().execute(build(), dict(values))]


class Loader:
    """Builds ``model`` objects from rows that hold its table's columns in table order (``RETURNING
    <table>.*``, or one table's columns of a join): as loaded from the database, with a persistent
    identity, nothing modified, attached to no session, the way ``Session.merge(load=False)`` builds
    one."""

    def __init__(self, model: type[Any]) -> None:
        self.model = model
        self._mapper = mapper = class_mapper(model)
        table = mapper.local_table
        self.width = len(table.columns)
        self._keys = [mapper.get_property_by_column(column).key for column in table.columns]
        positions: dict[Any, int] = {column: n for n, column in enumerate(table.columns)}
        self._primary_key = [positions[column] for column in mapper.primary_key]

    def load(self, values: Sequence[Any], offset: int = 0) -> Any:
        """The object of ``values[offset:offset + width]``; ``None`` when its primary key is
        ``None`` (the missing side of an outer join)."""
        identity = tuple(values[offset + n] for n in self._primary_key)
        if any(value is None for value in identity):
            return None
        instance = self._mapper.class_manager.new_instance()
        instance.__dict__.update(zip(self._keys, values[offset:offset + self.width]))
        instance_state(instance).key = self._mapper.identity_key_from_primary_key(identity)
        return instance
