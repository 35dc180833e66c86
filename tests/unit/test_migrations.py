"""Alembic: one head, and upgrade → downgrade → upgrade round-trips on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import uuid

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlmodel import SQLModel

import worker.db.models  # noqa: F401  (registers the tables)
from worker.db.migrate import alembic_config, downgrade, upgrade

PG_ADMIN_URL = os.environ.get("KEYROTOR_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def test_single_head_and_linear_history() -> None:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    heads = script.get_heads()
    assert len(heads) == 1, f"several Alembic heads: {heads}; chain the new revision after the current head"
    revisions = list(script.walk_revisions())
    assert revisions[-1].revision == "0001"
    assert "0002" in {r.revision for r in revisions}


def _tables(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def _diff(url: str) -> list[object]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return list(compare_metadata(MigrationContext.configure(conn), SQLModel.metadata))
    finally:
        engine.dispose()


def _round_trip(url: str) -> None:
    upgrade(url)
    full = _tables(url)
    assert "inventory_snapshot" in full
    assert _diff(url) == [], "the models and the migrations disagree"
    downgrade(url, "0001")
    assert "inventory_snapshot" not in _tables(url)
    downgrade(url, "base")
    assert _tables(url) == set()
    upgrade(url)
    assert _tables(url) == full


def test_round_trip_sqlite(tmp_path) -> None:  # type: ignore[no-untyped-def]
    _round_trip(f"sqlite:///{tmp_path}/migrations.db")


@pytest.fixture
def fresh_pg_url(pg_database_url: str):  # type: ignore[no-untyped-def]
    """An empty PostgreSQL database (not migrated), dropped afterwards."""
    name = f"keyrotor_mig_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def test_round_trip_postgresql(fresh_pg_url: str) -> None:
    _round_trip(fresh_pg_url)
