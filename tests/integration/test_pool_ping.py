"""Pooled PostgreSQL connections are pinged before use only after sitting idle
(``worker/db/session.py`` ``ping_idle_connections``): a busy worker makes no ping round trips, and
a connection the server dropped while it sat in the pool is replaced before anyone uses it."""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import pytest
import sqlalchemy as sa

from worker.db.session import make_engine


def _count_pings(engine: sa.engine.Engine, monkeypatch: Any) -> list[bool]:
    """Each ping the pool makes on ``engine`` (its answer, or ``False`` when it raised)."""
    pings: list[bool] = []
    real = engine.dialect.do_ping

    def counting(dbapi_conn: Any) -> bool:
        try:
            answer = real(dbapi_conn)
        except Exception:
            pings.append(False)
            raise
        pings.append(answer)
        return answer

    monkeypatch.setattr(engine.dialect, "do_ping", counting)
    return pings


@pytest.fixture
def pool_with_idle_ping(pg_url: str, monkeypatch: Any) -> Iterator[Callable[[str], tuple[sa.engine.Engine, list[bool]]]]:
    """An engine of one pooled connection made by ``make_engine`` with ``KEYROTOR_DB_PING_IDLE_S``
    set to the given value, and the pings its pool makes."""
    from worker.settings import get_settings

    engines: list[sa.engine.Engine] = []

    def build(idle_s: str) -> tuple[sa.engine.Engine, list[bool]]:
        monkeypatch.setenv("KEYROTOR_DB_PING_IDLE_S", idle_s)
        get_settings.cache_clear()
        engine = make_engine(pg_url, pool_size=1, max_overflow=0)
        engines.append(engine)
        return engine, _count_pings(engine, monkeypatch)

    yield build
    for engine in engines:
        engine.dispose()
    get_settings.cache_clear()


def test_a_busy_pool_does_not_ping_and_an_idle_dead_connection_is_replaced(pg_url: str, pool_with_idle_ping: Any) -> None:
    engine, pings = pool_with_idle_ping("0.5")
    pids = set()
    for _ in range(20):  # back to back: the connection never sits idle
        with engine.connect() as conn:
            pids.add(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())
    assert len(pids) == 1
    assert pings == [], "a connection in constant use was pinged"

    # The server drops the pooled connection while it sits idle (a restart, a proxy's timeout).
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        assert conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": next(iter(pids))}).scalar_one()
    admin.dispose()
    time.sleep(0.6)
    with engine.connect() as conn:  # no error: the ping found it dead and the pool reconnected
        assert conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one() not in pids
    assert pings == [False], "the idle connection was pinged once, found dead, and not pinged again when replaced"


def test_ping_idle_zero_pings_before_every_use(pool_with_idle_ping: Any) -> None:
    engine, pings = pool_with_idle_ping("0")
    for _ in range(3):
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    # The first checkout is of a connection made just then (nothing to ping); the two after it are.
    assert pings == [True, True]
