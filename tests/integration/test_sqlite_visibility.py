"""SQLite shared by several processes (the demo's in-process worker and the CLI, `keyrotor worker`
next to `keyrotor rotate`): a commit in one process must be seen by the other.

The bug behind "run.missing" in the demo: its leak scan read keyrotor.db/-wal/-shm with
``Path.read_bytes()`` inside the process whose worker holds SQLite connections to them. Closing
that file descriptor dropped every POSIX lock the process held on the files; the CLI's next
connection then found itself alone, checkpointed and deleted the WAL and -shm on close, and the
worker kept reading the deleted ones — it never saw the run the CLI had committed.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import text

from worker.db.session import make_engine, read_files_safely, session_scope
from keyrotor_sandbox.demo.invariants import read_blobs

pytestmark = pytest.mark.integration

#: Another process, like the CLI: one short-lived engine (its close is the "last connection" of
#: that process, which checkpoints and deletes the WAL when it can lock the file exclusively), then
#: a second engine that commits a row and stays alive until told to exit.
OTHER_PROCESS = textwrap.dedent("""
    import sys
    from sqlalchemy import text
    from worker.db.session import make_engine
    url = sys.argv[1]
    first = make_engine(url)
    with first.connect() as conn:
        conn.execute(text("SELECT count(*) FROM run")).all()
    first.dispose()
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO run (id) VALUES ('from-the-other-process')"))
    print("committed", flush=True)
    sys.stdin.readline()
""")


def _sees_row_committed_elsewhere(tmp_path: Path, between) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'keyrotor.db'}"
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE run (id TEXT PRIMARY KEY)"))
            conn.execute(text("INSERT INTO run (id) VALUES ('seed')"))
        between(tmp_path / "keyrotor.db")
        other = subprocess.Popen([sys.executable, "-c", OTHER_PROCESS, url], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert other.stdout is not None and other.stdout.readline().strip() == "committed"
            with engine.connect() as conn:  # a pooled connection of this process
                pooled = conn.execute(text("SELECT count(*) FROM run")).scalar_one()
            import sqlite3

            fresh_conn = sqlite3.connect(tmp_path / "keyrotor.db")
            fresh = fresh_conn.execute("SELECT count(*) FROM run").fetchone()[0]
            fresh_conn.close()
        finally:
            other.communicate("\n", timeout=20)
        return pooled, fresh
    finally:
        engine.dispose()


def _db_files(db: Path) -> list[Path]:
    return [db, Path(f"{db}-wal"), Path(f"{db}-shm")]


def test_a_commit_in_another_process_is_seen(tmp_path: Path) -> None:
    assert _sees_row_committed_elsewhere(tmp_path, lambda db: None) == (2, 2)


def test_the_demo_leak_scan_keeps_this_process_sqlite_locks(tmp_path: Path) -> None:
    scanned: dict[str, bytes] = {}
    seen = _sees_row_committed_elsewhere(tmp_path, lambda db: scanned.update(read_blobs(_db_files(db))))
    assert seen == (2, 2), "after scanning the database files, this process no longer sees other processes' commits"
    assert b"seed" in scanned["keyrotor.db"] + scanned.get("keyrotor.db-wal", b""), "the scan still reads the files"


def test_read_files_safely_returns_bytes_and_none_for_missing(tmp_path: Path) -> None:
    present = tmp_path / "a.bin"
    present.write_bytes(b"\x00\x01secret-ish\xff" * 1000)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    got = read_files_safely([str(present), str(tmp_path / "missing"), str(empty)])
    assert got == {str(present): present.read_bytes(), str(tmp_path / "missing"): None, str(empty): b""}


def test_a_savepoint_does_not_commit_the_callers_transaction_on_its_own(tmp_path: Path) -> None:
    """pysqlite's legacy transaction control: a SAVEPOINT before the first write opened the SQLite
    transaction and its RELEASE committed it (request_rotation's run, before its audit event and
    whatever the caller then decided)."""
    url = f"sqlite:///{tmp_path / 'keyrotor.db'}"
    engine = make_engine(url)
    other = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE run (id TEXT PRIMARY KEY)"))
        from sqlmodel import Session

        with Session(engine) as session:
            session.execute(text("SELECT count(*) FROM run")).all()
            nested = session.begin_nested()
            session.execute(text("INSERT INTO run (id) VALUES ('inside-savepoint')"))
            nested.commit()
            with other.connect() as conn:
                assert conn.execute(text("SELECT count(*) FROM run")).scalar_one() == 0, \
                    "the savepoint's RELEASE committed the caller's transaction"
            session.rollback()
        with other.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM run")).scalar_one() == 0
        with session_scope(engine) as session:  # and a normal commit still commits
            nested = session.begin_nested()
            session.execute(text("INSERT INTO run (id) VALUES ('kept')"))
            nested.commit()
        with other.connect() as conn:
            assert conn.execute(text("SELECT id FROM run")).scalars().all() == ["kept"]
    finally:
        engine.dispose()
        other.dispose()
