"""Database-level guarantees: one open run per key (invariant 3), append-only audit (invariant 6)."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlmodel import Session

from worker.clock import utcnow
from worker.db.models import AuditEvent, ManagedKey, ProviderRecord, RotationRun
from worker.protocol.states import RunState

pytestmark = pytest.mark.integration


def _key(session: Session) -> ManagedKey:
    session.add(ProviderRecord(name="alloy", kind="http", spec={}))
    session.commit()  # no ORM relationship orders the inserts, so the parent goes first
    key = ManagedKey(name="alloy/x", provider="alloy", credential_type="api_key", owner="o", vault_path="apps/x")
    session.add(key)
    session.commit()
    return key


def _run(key: ManagedKey, **kw: object) -> RotationRun:
    return RotationRun(id=uuid.uuid4().hex, key_id=key.id, state=RunState.requested, trigger="manual",
                       requested_by="test", created_at=utcnow(), **kw)


def test_database_refuses_a_second_open_run(engine) -> None:  # type: ignore[no-untyped-def]
    with Session(engine) as session:
        key = _key(session)
        session.add(_run(key))
        session.commit()
        session.add(_run(key))
        with pytest.raises(IntegrityError):
            session.commit()


def test_finished_runs_do_not_block_a_new_one(engine) -> None:  # type: ignore[no-untyped-def]
    with Session(engine) as session:
        key = _key(session)
        session.add(_run(key, finished_at=utcnow()))
        session.add(_run(key, finished_at=utcnow()))
        session.add(_run(key))
        session.commit()
        assert session.exec(sa.select(sa.func.count()).select_from(RotationRun)).one()[0] == 3


def test_idempotency_key_is_unique(engine) -> None:  # type: ignore[no-untyped-def]
    with Session(engine) as session:
        key = _key(session)
        session.add(_run(key, idempotency_key="req-1", finished_at=utcnow()))
        session.commit()
        session.add(_run(key, idempotency_key="req-1"))
        with pytest.raises(IntegrityError):
            session.commit()


def test_audit_trail_is_append_only(engine) -> None:  # type: ignore[no-untyped-def]
    with Session(engine) as session:
        session.add(AuditEvent(at=utcnow(), actor="test", event="state_changed", detail={}))
        session.commit()
    for statement in ("UPDATE audit_event SET actor = 'mallory'", "DELETE FROM audit_event"):
        with engine.connect() as conn:
            with pytest.raises(DBAPIError, match="append-only"):
                conn.execute(sa.text(statement))
                conn.commit()
