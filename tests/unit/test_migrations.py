"""Alembic: one head, and upgrade → downgrade → upgrade round-trips on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlmodel import SQLModel

import worker.db.models  # noqa: F401  (registers the tables)
from worker.db.migrate import alembic_config, downgrade, ensure_current, schema_status, upgrade


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


def test_round_trip_postgresql(empty_pg_url: str) -> None:
    _round_trip(empty_pg_url)


def test_sqlite_upgrades_itself_and_tolerates_a_newer_schema(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # The embedded SQLite default has no hook Job: opening it upgrades it; a revision from a newer
    # release (an older binary run again) is a warning, not "Can't locate revision".
    url = f"sqlite:///{tmp_path}/embedded.db"
    engine = sa.create_engine(url)
    try:
        assert schema_status(engine).state == "empty"
        assert ensure_current(engine).state == "current"
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = '9f00_newer'"))
        status = ensure_current(engine)
        assert status.state == "ahead" and status.revisions == ("9f00_newer",)
    finally:
        engine.dispose()
