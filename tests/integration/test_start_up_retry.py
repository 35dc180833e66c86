"""A service's start-up database checks (``keyrotor worker``, ``keyrotor scheduler``) try again when
PostgreSQL drops a connection in the middle of them, and fail at once when nothing answers
(``worker/cli/common.py`` ``retried_if_dropped``). The chaos soak found workers exiting at start-up
because a terminated backend met their schema check."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from worker.cli.common import retried_if_dropped

pytestmark = pytest.mark.integration


def test_a_connection_dropped_mid_check_is_tried_again(pg_url: str) -> None:
    engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    calls: list[int] = []

    def check() -> int:
        calls.append(1)
        with engine.connect() as conn:
            pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
            if len(calls) == 1:  # the server drops this connection while the check is under way
                with admin.connect() as other:
                    other.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            return int(conn.execute(sa.text("SELECT 42")).scalar_one())

    try:
        assert retried_if_dropped(check, pause_s=0.01) == 42
        assert len(calls) == 2
    finally:
        engine.dispose()
        admin.dispose()


def test_a_server_that_does_not_answer_fails_at_once_and_a_dropping_one_after_the_last_attempt() -> None:
    refused = sa.create_engine("postgresql+psycopg://postgres@127.0.0.1:1/keyrotor", poolclass=sa.pool.NullPool)
    calls: list[int] = []

    def check() -> None:
        calls.append(1)
        with refused.connect():
            pass

    with pytest.raises(sa.exc.OperationalError):
        retried_if_dropped(check, pause_s=0.01)
    assert len(calls) == 1  # refused: no second try

    dropped: list[int] = []

    def always_dropped() -> None:
        dropped.append(1)
        raise sa.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"),
                                      connection_invalidated=True)

    with pytest.raises(sa.exc.OperationalError):
        retried_if_dropped(always_dropped, attempts=3, pause_s=0.01)
    assert len(dropped) == 3
