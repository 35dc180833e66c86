"""Statements sent on the session's psycopg connection directly (worker/db/direct.py) keep what
SQLAlchemy's execution did for them: the same objects as the ORM loads, the same errors, the same
events, a lost connection never handed out again."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event, insert, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm.attributes import instance_state
from sqlmodel import Session

from worker.db import direct
from worker.db.direct import DirectStatements, Loader
from worker.db.models import AuditEvent, KeyVersion, ManagedKey, ProviderRecord, RotationRun, VersionStage
from worker.db.session import make_engine, session_scope
from worker.protocol import RunState

pytestmark = pytest.mark.integration

MODELS = (ProviderRecord, ManagedKey, KeyVersion, RotationRun)


def _seed(engine: sa.Engine) -> None:
    with session_scope(engine) as session:
        session.add(ProviderRecord(name="p", kind="http", mode="overlap", spec={"base_url": "https://x", "n": [1, 2]}))
        session.flush()
        session.add(ManagedKey(name="k", provider="p", credential_type="api_key", owner="o@example.com",
                               vault_path="apps/k", integrations=["a", "b"], labels={"team": "x"},
                               contact={"email": "o@example.com"}, expires_at=datetime(2027, 1, 2, tzinfo=timezone.utc)))
        session.flush()
        session.add(KeyVersion(key_id=1, credential_type="api_key", stage=VersionStage.current, fingerprint="sha256:ab",
                               provider_key_id="id-1", vault_version=3))
        session.flush()
        session.add(RotationRun(id="run-1", key_id=1, state=RunState.issued, trigger="manual", requested_by="t",
                                old_version_id=1, not_before=datetime(2026, 1, 1, tzinfo=timezone.utc)))


def _columns(obj: Any) -> dict[str, Any]:
    return {column.key: getattr(obj, column.key) for column in type(obj).__table__.columns}


def test_objects_built_from_a_direct_row_are_those_the_orm_loads(pg_url: str) -> None:
    engine = make_engine(pg_url)
    _seed(engine)
    statements = DirectStatements()
    for model in MODELS:
        table = model.__table__  # type: ignore[attr-defined]
        with Session(engine) as session:
            expected = session.exec(select(model)).scalars().one()  # type: ignore[call-overload]
            expected_columns = _columns(expected)
        with Session(engine) as session:
            rows = direct.execute(session, statements.get(model.__name__, engine.dialect, lambda: select(*table.c)), {})
        built = Loader(model).load(rows[0])
        assert type(built) is model
        assert _columns(built) == expected_columns
        state = instance_state(built)
        assert state.key == instance_state(expected).key and state.detached and not state.modified
        # It joins a session as a loaded row does: found by primary key without a query, clean.
        seen: list[str] = []

        def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            seen.append(statement)

        event.listen(engine, "before_cursor_execute", record)
        with Session(engine) as session:
            merged = session.merge(built, load=False)
            assert session.get(model, state.key[1]) is merged and not session.dirty
        event.remove(engine, "before_cursor_execute", record)
        assert seen == []
    engine.dispose()


def test_the_missing_side_of_an_outer_join_is_none(pg_url: str) -> None:
    engine = make_engine(pg_url)
    _seed(engine)
    runs, versions = RotationRun.__table__, KeyVersion.__table__  # type: ignore[attr-defined]
    statement = (select(*runs.c, *versions.c).select_from(runs)
                 .outerjoin(versions, versions.c.id == runs.c.new_version_id))
    with Session(engine) as session:
        (row,) = direct.execute(session, DirectStatements().get("join", engine.dialect, lambda: statement), {})
    run_loader = Loader(RotationRun)
    assert run_loader.load(row).id == "run-1"
    assert Loader(KeyVersion).load(row, run_loader.width) is None
    engine.dispose()


def test_values_go_through_their_types_and_errors_are_sqlalchemys(pg_url: str) -> None:
    engine = make_engine(pg_url)
    _seed(engine)
    table = AuditEvent.__table__  # type: ignore[attr-defined]
    values = {"at": datetime.now(timezone.utc), "run_id": "run-1", "key_id": 1, "actor": "t", "event": "e",
              "from_state": None, "to_state": None, "detail": {"nested": {"n": 1}, "list": ["a"]}}
    add = DirectStatements().get("audit", engine.dialect, lambda: insert(table).values(
        {name: sa.bindparam(name, type_=table.c[name].type) for name in values}).returning(table.c.id, table.c.detail))
    with session_scope(engine) as session:
        ((_id, detail),) = direct.execute(session, add, values)
    assert detail == {"nested": {"n": 1}, "list": ["a"]}  # the JSON column's value, stored and read back
    runs = RotationRun.__table__  # type: ignore[attr-defined]
    open_run = {"id": "run-2", "key_id": 1, "state": "requested", "mode": "overlap", "trigger": "manual",
                "requested_by": "t", "emergency": False, "attempts": 0, "requeues": 0}
    second = DirectStatements().get("run", engine.dialect, lambda: insert(runs).values(
        {name: sa.bindparam(name, type_=runs.c[name].type) for name in open_run}))
    with pytest.raises(IntegrityError):  # a second open run for the key: the unique index refuses it
        with session_scope(engine) as session:
            direct.execute(session, second, open_run)
    engine.dispose()


def test_a_connection_lost_under_a_direct_statement_is_never_handed_out_again(pg_url: str) -> None:
    engine = make_engine(pg_url, pool_size=1, max_overflow=0)
    _seed(engine)
    ping = DirectStatements().get("one", engine.dialect, lambda: select(sa.literal(1)))
    with Session(engine) as session:
        pid = session.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar()
    admin = make_engine(pg_url)
    with admin.begin() as conn:
        conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    admin.dispose()
    with pytest.raises(OperationalError) as raised:
        with Session(engine) as session:
            direct.execute(session, ping, {})
    assert raised.value.connection_invalidated
    with Session(engine) as session:  # the pool's one connection is a new one, and answers
        assert direct.execute(session, ping, {}) == [(1,)]
        assert session.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar() != pid
    engine.dispose()


def test_a_statement_whose_values_sqlalchemy_renders_at_execution_is_refused_when_built(pg_url: str) -> None:
    engine = make_engine(pg_url)
    runs = RotationRun.__table__  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="plain bind parameters only"):
        direct.DirectStatement(select(runs.c.id).where(runs.c.state.in_(["issued", "verified"])), engine.dialect)
    engine.dispose()


def test_a_keys_integration_records_are_read_alike_directly_and_through_the_orm(db_url: str) -> None:
    from worker.db.models import IntegrationRecord
    from worker.pipeline.preflight import integration_records

    engine = make_engine(db_url)
    with session_scope(engine) as session:
        for name in ("a", "b", "c"):
            session.add(IntegrationRecord(name=name, kind="vault_copy", spec={"path": f"copies/{name}"}))
    key = ManagedKey(name="k", provider="p", credential_type="api_key", owner="o@example.com", vault_path="apps/k",
                     integrations=["b", "missing", "a"], labels={})
    with Session(engine) as session:
        records = integration_records(session, key)
    assert list(records) == ["b", "a"]  # the key's order; a record not applied is left out
    assert [(r.name, r.kind, r.spec) for r in records.values()] == [
        ("b", "vault_copy", {"path": "copies/b"}), ("a", "vault_copy", {"path": "copies/a"})]
    engine.dispose()


def test_versions_are_adopted_and_recorded_alike_on_both_databases(db_url: str) -> None:
    """The version bookkeeping of ``issue`` (steps/versions.py), sent directly on PostgreSQL and
    through the ORM elsewhere: a key's first rotation adopts what Vault serves; a value changed in
    Vault out of band is adopted too, and the version the database held as current becomes
    ``previous``."""
    from sqlmodel import select as sqlmodel_select

    from tests.fakes_pipeline import FakeProvider, World

    world = World(url=db_url, provider=FakeProvider()).build(grace_period_s=0)
    assert world.drive(world.request()) == RunState.completed
    out_of_band = world.provider.add_existing("changed by hand")
    world.vault.seed("secret", f"apps/{world.key.name}", "api_key", out_of_band.secret, out_of_band.key_id)  # type: ignore[union-attr]
    run_id = world.request()
    assert world.drive(run_id) == RunState.completed
    with Session(world.engine) as session:
        versions = session.exec(sqlmodel_select(KeyVersion).order_by(KeyVersion.id)).all()  # type: ignore[arg-type]
        run = session.get(RotationRun, run_id)
        adopted = session.exec(sqlmodel_select(AuditEvent).where(AuditEvent.event == "version_adopted")).all()
    assert [(v.stage, v.run_id is None, v.provider_key_id) for v in versions] == [
        ("retired", True, world.old.key_id),  # type: ignore[union-attr]  # adopted by the first rotation, retired by it
        ("previous", False, versions[1].provider_key_id),  # the first rotation's key: current until changed by hand
        ("retired", True, out_of_band.key_id),  # adopted from Vault by the second rotation, retired by it
        ("current", False, versions[3].provider_key_id),  # the second rotation's key
    ]
    assert run is not None and (run.old_version_id, run.new_version_id) == (versions[2].id, versions[3].id)
    assert len(adopted) == 2
    world.engine.dispose()
