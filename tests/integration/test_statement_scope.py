"""``statement_scope`` (worker/db/session.py): a pooled connection for a durable point sent as one
statement. On PostgreSQL it is in autocommit, so the statement is committed when it returns (no
BEGIN, no COMMIT), and the connection goes back to the pool out of autocommit: the next session's
transaction on it is a real one. On SQLite it is a transaction, committed on success and rolled
back on an error. ``transition_alone`` moves a run on such a connection and does at once what a
session's transition leaves for its commit."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import Session

from worker.db.models import ManagedKey, ProviderRecord, RotationRun
from worker.db.session import make_engine, statement_scope
from worker.errors import StateConflict
from worker.metrics import ROTATIONS
from worker.pipeline.runs import transition_alone
from worker.protocol.states import RunState

pytestmark = pytest.mark.integration


def _add_key_and_run(engine: sa.engine.Engine, state: RunState) -> RotationRun:
    with Session(engine, expire_on_commit=False) as session:
        session.add(ProviderRecord(name="alloy", kind="http", mode="overlap", spec={}))
        session.flush()
        key = ManagedKey(name="acme/scope", provider="alloy", credential_type="api_key",
                         owner="o@example.com", vault_path="acme/scope")
        session.add(key)
        session.flush()
        run = RotationRun(id="run-scope", key_id=key.id, state=state, trigger="manual", requested_by="test")
        session.add(run)
        session.commit()
        return run


def _state(engine: sa.engine.Engine) -> str:
    with engine.connect() as connection:
        return str(connection.execute(sa.text("SELECT state FROM rotation_run WHERE id = 'run-scope'")).scalar_one())


def test_postgresql_statement_commits_by_itself_and_the_pool_gets_a_transactional_connection(pg_url: str) -> None:
    from psycopg.pq import TransactionStatus

    engine = make_engine(pg_url, pool_size=1, max_overflow=0)
    try:
        _add_key_and_run(engine, RunState.requested)
        with statement_scope(engine) as connection:
            connection.execute(sa.text("UPDATE rotation_run SET requested_by = 'scope' WHERE id = 'run-scope'"))
            dbapi: Any = connection.connection.dbapi_connection
            # No transaction open on the server: the UPDATE was committed as it returned.
            assert dbapi.info.transaction_status == TransactionStatus.IDLE
            with make_engine(pg_url).connect() as other:
                assert other.execute(sa.text("SELECT requested_by FROM rotation_run")).scalar_one() == "scope"
        # The pool's one connection again, out of autocommit: a session's change rolls back.
        with Session(engine) as session:
            session.execute(sa.text("UPDATE rotation_run SET requested_by = 'rolled back' WHERE id = 'run-scope'"))
            assert session.connection().connection.dbapi_connection.autocommit is False
            session.rollback()
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT requested_by FROM rotation_run")).scalar_one() == "scope"
    finally:
        engine.dispose()


def test_sqlite_scope_is_a_transaction(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    try:
        _add_key_and_run(engine, RunState.requested)
        with pytest.raises(RuntimeError), statement_scope(engine) as connection:
            connection.execute(sa.text("UPDATE rotation_run SET requested_by = 'first' WHERE id = 'run-scope'"))
            raise RuntimeError("the second statement failed")
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT requested_by FROM rotation_run")).scalar_one() == "test"
        with statement_scope(engine) as connection:
            connection.execute(sa.text("UPDATE rotation_run SET requested_by = 'kept' WHERE id = 'run-scope'"))
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT requested_by FROM rotation_run")).scalar_one() == "kept"
    finally:
        engine.dispose()


def test_transition_alone_moves_audits_and_counts_at_once(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(pg_url)
    marked: list[bool] = []
    monkeypatch.setattr("worker.pipeline.runs.transitioned", lambda: marked.append(True))
    before = ROTATIONS.labels(provider="alloy", outcome=RunState.completed.value)._value.get()
    try:
        run = _add_key_and_run(engine, RunState.retired)
        with statement_scope(engine) as connection:
            moved = transition_alone(connection, run, RunState.completed, actor="test", provider="alloy")
            # Done before the scope ends: the statement was the transaction.
            assert marked == [True]
            assert ROTATIONS.labels(provider="alloy", outcome="completed")._value.get() == before + 1
        assert moved is run
        assert _state(engine) == "completed"
        with engine.connect() as connection:
            events = connection.execute(sa.text(
                "SELECT from_state, to_state FROM audit_event WHERE run_id = 'run-scope'")).all()
        assert [tuple(e) for e in events] == [("retired", "completed")]
        # A second move from the same (now stale) state finds the run moved on: nothing counted.
        with pytest.raises(StateConflict), statement_scope(engine) as connection:
            transition_alone(connection, run, RunState.completed, actor="test", provider="alloy")
        assert marked == [True]
        assert ROTATIONS.labels(provider="alloy", outcome="completed")._value.get() == before + 1
    finally:
        engine.dispose()


def test_transition_alone_needs_postgresql(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    try:
        run = _add_key_and_run(engine, RunState.retired)
        with pytest.raises(ValueError, match="PostgreSQL"), statement_scope(engine) as connection:
            transition_alone(connection, run, RunState.completed, actor="test", provider="alloy")
        assert _state(engine) == "retired"
    finally:
        engine.dispose()
