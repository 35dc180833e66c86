"""Alembic, driven from code: ``keyrotor db upgrade`` and the tests use the same path.

Who migrates: on PostgreSQL only ``keyrotor db upgrade`` (the Helm chart's pre-install/pre-upgrade
hook Job), serialised by a PostgreSQL advisory lock, so several Jobs or operators started together
apply each revision once. Every other command calls ``ensure_current``: a database behind this
release stops it with one line saying to run ``keyrotor db upgrade``; a database *ahead* of it
(a newer release applied a backward-compatible migration, then ``helm rollback`` brought this
image back) starts with a warning. An SQLite file (the embedded default, one host) still upgrades
itself, so ``make demo`` needs nothing.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import pool, text
from sqlalchemy.engine import Connection, Engine

from worker.errors import ConfigError
from worker.log import get_logger
from worker.db.session import make_engine

log = get_logger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")

#: Key of the PostgreSQL advisory lock held while migrating (any fixed 64-bit number; advisory
#: locks are per database, so two keyrotor databases on one server do not wait for each other).
MIGRATION_LOCK_ID = 0x6B6579726F746F72  # "keyrotor"

SchemaState = Literal["current", "behind", "empty", "ahead"]


class SchemaBehind(ConfigError):
    """The database's schema is older than this release: ``keyrotor db upgrade`` must run first."""


@dataclass(frozen=True)
class SchemaStatus:
    state: SchemaState
    revisions: tuple[str, ...]  # what alembic_version holds (empty for an unmigrated database)
    head: str                   # the newest revision this release knows

    @property
    def revision_text(self) -> str:
        return ", ".join(self.revisions) or "none"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def script_head() -> str:
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None, "no migrations"
    return head


@contextmanager
def _migration_connection(url: str) -> Iterator[Connection]:
    """One connection, holding the migration lock on PostgreSQL, that Alembic then runs on.

    A session-level lock (not a transaction-level one) so it also covers a migration that commits
    part-way (``autocommit_block``). If this process dies, PostgreSQL drops the lock with the
    connection.
    """
    engine = make_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            locking = conn.dialect.name == "postgresql"
            if locking:
                got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": MIGRATION_LOCK_ID}).scalar()
                if not got:
                    log.info("db.migration_lock_wait", detail="another `keyrotor db upgrade` is migrating; waiting for it")
                    conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK_ID})
                conn.commit()
            yield conn
            if locking:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK_ID})
                conn.commit()
    finally:
        engine.dispose()


def _run(url: str, fn: str, revision: str) -> None:
    cfg = alembic_config(url)
    with _migration_connection(url) as conn:
        with conn.begin():  # Alembic sees a transaction in progress and runs inside it
            cfg.attributes["connection"] = conn
            getattr(command, fn)(cfg, revision)


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema at ``url`` up to ``revision``; concurrent callers apply each step once."""
    _run(url, "upgrade", revision)


def downgrade(url: str, revision: str) -> None:
    _run(url, "downgrade", revision)


def schema_status(engine: Engine) -> SchemaStatus:
    """Where the database's schema stands relative to this release's migrations."""
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    head = script_head()
    with engine.connect() as conn:
        revisions = tuple(sorted(MigrationContext.configure(conn).get_current_heads()))
    if not revisions:
        return SchemaStatus("empty", revisions, head)
    if revisions == (head,):
        return SchemaStatus("current", revisions, head)
    for rev in revisions:
        try:
            known = script.get_revision(rev)
        except CommandError:  # alembic's ResolutionError: an id this release has never seen
            known = None
        if known is None:
            return SchemaStatus("ahead", revisions, head)
    return SchemaStatus("behind", revisions, head)


def ensure_current(engine: Engine) -> SchemaStatus:
    """Refuse to start on a schema older than this release; warn on a newer one.

    An SQLite database is upgraded here instead (embedded, one host: no hook Job runs for it).
    """
    status = schema_status(engine)
    if status.state == "ahead":
        log.warning("db.schema_ahead", revision=status.revision_text, release_head=status.head,
                    detail="the database was migrated by a newer keyrotor release; starting anyway "
                           "(its migrations are backward compatible). Upgrade this deployment soon.")
        return status
    if status.state == "current":
        return status
    if engine.dialect.name == "sqlite":
        upgrade(engine.url.render_as_string(hide_password=False))
        return schema_status(engine)
    if status.state == "empty":
        raise SchemaBehind(f"the database has no keyrotor schema yet (this release needs revision {status.head}); "
                           "run `keyrotor db upgrade` first")
    raise SchemaBehind(f"the database schema is at revision {status.revision_text} but this release needs "
                       f"{status.head}; run `keyrotor db upgrade` first")
