"""Who migrates, on the real PostgreSQL: only `keyrotor db upgrade`, serialised by an advisory lock;
every other command checks the schema first (behind → one line and exit 2; ahead, after a
rollback to an older image → starts with a warning)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from worker.db.migrate import script_head, upgrade

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
FUTURE = "9f00_from_a_newer_release"


def _env(db_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYROTOR_", "VAULT_"))}
    env.update({"KEYROTOR_DATABASE_URL": db_url, "KEYROTOR_METRICS_PORT": "0", "KEYROTOR_LOG_FORMAT": "json"}, **extra)
    return env


def _keyrotor(*args: str, env: dict[str, str], **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "worker.cli.main", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)  # type: ignore[call-overload]


def _revisions(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table("alembic_version"):
                return set()
            return {row[0] for row in conn.execute(sa.text("SELECT version_num FROM alembic_version"))}
    finally:
        engine.dispose()


def _waiting_backends(url: str) -> int:
    """Sessions of this database that wait for a lock (whatever lock: row, catalog or advisory)."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text(
                "SELECT count(DISTINCT l.pid) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE NOT l.granted AND a.datname = current_database()")).scalar() or 0)
    finally:
        engine.dispose()


def test_four_concurrent_db_upgrades_on_an_empty_database_all_succeed(empty_pg_url: str) -> None:
    # A barrier that needs nothing from keyrotor: the test creates alembic_version in a transaction
    # it keeps open, so each upgrade, having seen no such table, blocks (on the catalog, or on the
    # migration lock behind the first one) until all four are waiting; then the test rolls back
    # and they go at once, as four hook Jobs or operators started together would.
    holder = sa.create_engine(empty_pg_url, poolclass=sa.pool.NullPool)
    conn = holder.connect()
    conn.execute(sa.text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)"))
    procs = [_keyrotor("db", "upgrade", env=_env(empty_pg_url)) for _ in range(4)]
    try:
        deadline = time.monotonic() + 90
        while _waiting_backends(empty_pg_url) < 4 and any(p.poll() is None for p in procs):
            assert time.monotonic() < deadline, "the four upgrades never all waited"
            time.sleep(0.05)
    finally:
        conn.rollback()
        conn.close()
        holder.dispose()
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    assert [code for code, _, _ in results] == [0, 0, 0, 0], [err for _, _, err in results]
    for _, out, err in results:
        assert "Traceback" not in err and "UniqueViolation" not in err
        assert "database at revision" in out
    assert _revisions(empty_pg_url) == {script_head()}


def _stamp(url: str, revision: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = :r"), {"r": revision})
    engine.dispose()


def test_a_database_ahead_of_this_release_starts_worker_and_cli_with_a_warning(empty_pg_url: str, redis_url: str,
                                                                              redis_namespace: str) -> None:
    # After `helm rollback` to an image older than a (backward-compatible) migration.
    upgrade(empty_pg_url)
    _stamp(empty_pg_url, FUTURE)
    # A worker needs a Vault address to start (nothing here talks to it).
    env = _env(empty_pg_url, KEYROTOR_REDIS_URL=redis_url, KEYROTOR_QUEUE_NAMESPACE=redis_namespace,
               VAULT_ADDR="http://127.0.0.1:9", VAULT_TOKEN="unused")

    status = _keyrotor("status", env=env)
    out, err = status.communicate(timeout=60)
    assert status.returncode == 0, err
    assert "Traceback" not in err and "Can't locate revision" not in err
    assert "db.schema_ahead" in err and FUTURE in err

    again = _keyrotor("db", "upgrade", env=env)  # the hook Job of an older chart version
    out, err = again.communicate(timeout=60)
    assert again.returncode == 0, err
    assert "nothing to do" in out and "Traceback" not in err

    worker = _keyrotor("worker", "--processes", "1", "--threads", "1", env=env)
    try:
        seen: list[str] = []
        assert worker.stdout is not None
        for line in worker.stdout:
            seen.append(line)
            if "worker.started" in line:
                break
        assert any("db.schema_ahead" in line and FUTURE in line for line in seen), seen
        assert worker.poll() is None
    finally:
        worker.terminate()
        worker.communicate(timeout=60)
    assert _revisions(empty_pg_url) == {FUTURE}  # nobody tried to "fix" it


@pytest.mark.parametrize("at", ["0002", None])
def test_a_database_behind_this_release_stops_every_command_with_one_line(empty_pg_url: str, redis_url: str,
                                                                          redis_namespace: str, tmp_path: Path,
                                                                          at: str | None) -> None:
    if at:
        upgrade(empty_pg_url, at)
    inventory = REPO / "config" / "keyrotor.example.yaml"
    env = _env(empty_pg_url, KEYROTOR_REDIS_URL=redis_url, KEYROTOR_QUEUE_NAMESPACE=redis_namespace,
               VAULT_ADDR="http://127.0.0.1:9", VAULT_TOKEN="unused")
    commands: tuple[list[str], ...] = (["status"], ["worker", "--processes", "1"])
    if at:
        commands += (["scheduler"], ["plan"], ["config", "apply", str(inventory)])
    procs = [(args, _keyrotor(*args, env=env)) for args in commands]
    for args, proc in procs:
        out, err = proc.communicate(timeout=120)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 2, (args, err)
        assert len(lines) == 1 and "Traceback" not in err, (args, err)
        assert "run `keyrotor db upgrade`" in lines[0] and script_head() in lines[0], (args, lines)
    assert _revisions(empty_pg_url) == ({at} if at else set())  # none of them migrated

    upgrade_proc = _keyrotor("db", "upgrade", env=env)
    _, err = upgrade_proc.communicate(timeout=60)
    assert upgrade_proc.returncode == 0, err
    status = _keyrotor("status", env=env)
    _, err = status.communicate(timeout=60)
    assert status.returncode == 0, err
