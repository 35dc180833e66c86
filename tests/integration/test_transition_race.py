"""Statements first compiled by many threads at once (worker/db/statements.py).

A chain's hand-off statement shared by the worker's threads once compiled, under load, with its
CTE's columns missing: a cartesian product with ``rotation_run`` that returned another run's row
to the next step (seen in the benchmark; this test, with one statement shared by the threads of
each round, failed within 200 rounds in each of two runs). Each thread now builds its own. Every
round here starts new threads (new per-thread statements) and empties the engine's compiled
cache, so every round is a first compile in eight threads at once."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import update
from sqlmodel import Session

from worker.db.models import ManagedKey, ProviderRecord, RotationRun
from worker.db.session import make_engine, session_scope
from worker.pipeline import row_writes, runs
from worker.pipeline.steps import common
from worker.protocol import RunState

pytestmark = pytest.mark.integration

THREADS = 8
ROUNDS = 200


def _forget_shared_statements() -> None:
    """Empty the caches of statements shared by the threads (the transitions', compiled once
    under a lock, worker/db/direct.py; a plain dict, were one shared again): this round's threads
    then compile them anew, all at once, as the workers did."""
    runs._TRANSITIONS.clear()
    common._CLAIM_AND_READ.clear()
    for cache in (row_writes._TOGETHER, row_writes._ALONE):
        if isinstance(cache, dict):
            cache.clear()


# SQLAlchemy's cartesian-product warning (the race's mark) fails the round that compiled it. Set for
# the whole test, not per thread: ``warnings.catch_warnings`` is not thread-safe.
@pytest.mark.filterwarnings("error::sqlalchemy.exc.SAWarning")
def test_statements_first_compiled_by_many_threads_return_each_thread_its_own_run(pg_url: str) -> None:
    engine = make_engine(pg_url, pool_size=THREADS)
    with session_scope(engine) as session:
        session.add(ProviderRecord(name="p", kind="http", mode="overlap", spec={}))
        session.flush()
        for i in range(THREADS):
            session.add(ManagedKey(name=f"k{i}", provider="p", credential_type="api_key", owner="o@example.com",
                                   vault_path=f"apps/{i}", integrations=[], labels={}))
        session.flush()
        for i in range(THREADS):
            session.add(RotationRun(id=f"run-{i}", key_id=i + 1, state=RunState.issued, trigger="manual",
                                    requested_by="test"))
    wrong: list[str] = []

    def claim_then_hand_off(i: int, barrier: threading.Barrier) -> None:
        run_id = f"run-{i}"
        until = datetime.now(timezone.utc) + timedelta(seconds=30)
        claim = {"claim_run": run_id, "claim_state": RunState.issued.value, "claim_now": datetime.now(timezone.utc),
                 "claim_owner": f"owner-{i}", "claim_until": until}
        try:
            barrier.wait()
            with Session(engine) as session:
                row = common.claim_and_read(session, claim)
                if row is None or row[0].id != run_id or row[1].id != i + 1:
                    wrong.append(f"claim of {run_id} read {row and (row[0].id, row[1].id)}")
                session.commit()
            barrier.wait()
            with Session(engine) as session:
                run = session.get(RotationRun, run_id)
                assert run is not None
                moved = runs.transition(session, run, RunState.prechecked, actor="test", lease=(f"owner-{i}", until))
                if moved.id != run_id:
                    wrong.append(f"hand-off of {run_id} returned {moved.id}")
                session.commit()
        except Exception as exc:  # noqa: BLE001 - recorded and asserted below
            wrong.append(f"{run_id}: {type(exc).__name__}: {str(exc)[:200]}")
            barrier.abort()  # the others stop waiting for this thread at the next barrier

    for _ in range(ROUNDS):
        _forget_shared_statements()
        engine._compiled_cache.clear()  # type: ignore[attr-defined]
        with engine.begin() as conn:
            conn.execute(update(RotationRun).values(state=RunState.issued.value, lease_owner=None, lease_until=None))
        barrier = threading.Barrier(THREADS, timeout=60)
        threads = [threading.Thread(target=claim_then_hand_off, args=(i, barrier)) for i in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    engine.dispose()
    assert wrong == []
