"""Detection requests the due keys' runs in one transaction (``worker.pipeline.batch_requests``):
a fixed number of SQL statements whatever the number of keys due, the same runs, audit events and
messages as one ``request_rotation`` per key, and one bad key or a failed batch loses nothing.
SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
import threading
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator

import pytest
from sqlalchemy import event
from sqlmodel import select

from tests.scheduler_fakes import ALLOY_SPEC, add_key, add_provider
from worker.clock import set_clock
from worker.db.models import AuditEvent, ManagedKey, ProviderRecord, RotationRun
from worker.db.session import session_scope
from worker.pipeline.batch_requests import request_rotations
from worker.protocol.states import RunState
from worker.service.detection import detect_due, due_idempotency_key
from worker.service.due import refresh_next_due
from worker.service.hooks import Pipeline, default_pipeline

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
DAY = timedelta(days=1)


@pytest.fixture(autouse=True)
def clock() -> Iterator[None]:
    set_clock(lambda: T0 + 2 * DAY)
    yield
    set_clock(None)


def _keys(engine: Any, count: int, *, start: int = 0, spec: dict[str, Any] = ALLOY_SPEC, provider: str = "alloy",
          **fields: Any) -> None:
    with session_scope(engine) as s:
        if s.get(ProviderRecord, provider) is None:
            add_provider(s, provider, spec)
            s.flush()
        for i in range(start, start + count):
            key = add_key(s, f"{provider}/k{i:04d}", provider, expires_at=T0 + DAY + timedelta(seconds=i % 1000),
                          expiry_lead_time_s=0, **fields)
            refresh_next_due(s, key, T0)


def _pipeline(sent: list[str], batched: bool = True) -> Pipeline:
    real = dataclasses.replace(default_pipeline(), enqueue_run=lambda run: sent.append(run.id))
    return real if batched else dataclasses.replace(real, request_rotations=None)


def _statements(engine: Any, due: int, batched: bool = True) -> int:
    _keys(engine, due, start=10_000 * due + (0 if batched else 5_000))
    seen: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement)

    sent: list[str] = []
    event.listen(engine, "before_cursor_execute", count)
    try:
        result = detect_due(engine, now=T0 + 2 * DAY, pipeline=_pipeline(sent, batched))
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert len(result.requested) == due and sorted(sent) == sorted(result.requested) and not result.errors
    return len(seen)


def test_a_pass_costs_the_same_statements_for_10_or_100_due_keys(engine) -> None:  # type: ignore[no-untyped-def]
    """O(1) statements in the number of keys due (the per-key path costs several per key)."""
    ten = _statements(engine, 10)
    hundred = _statements(engine, 100)
    assert ten == hundred <= 5, (ten, hundred)
    per_key = _statements(engine, 10, batched=False)
    assert per_key >= 5 * 10, per_key


def test_batched_runs_and_audit_match_one_request_per_key(engine) -> None:  # type: ignore[no-untyped-def]
    _keys(engine, 3)
    _keys(engine, 3, provider="other", spec=dict(ALLOY_SPEC, mode="cutover"))
    sent: list[str] = []
    result = detect_due(engine, now=T0 + 2 * DAY, pipeline=_pipeline(sent))
    assert len(result.requested) == 6 and sent == result.requested and result.joined == []
    with session_scope(engine) as s:
        runs = s.exec(select(RotationRun, ManagedKey).join(ManagedKey, ManagedKey.id == RotationRun.key_id)).all()
        for run, key in runs:
            assert (run.state, run.trigger, run.reason, run.requested_by) == (RunState.requested.value, "schedule",
                                                                             "expiry", "scheduler")
            assert run.mode == ("cutover" if key.provider == "other" else "overlap")
            assert run.idempotency_key == due_idempotency_key(key.id, key.next_due_at)
            assert run.step_deadline_at is not None and run.finished_at is None
            [audit] = s.exec(select(AuditEvent).where(AuditEvent.run_id == run.id)).all()
            assert (audit.event, audit.to_state, audit.actor, audit.key_id) == ("state_changed", "requested", "scheduler", key.id)
            assert audit.detail == {"trigger": "schedule", "reason": "expiry", "idempotency_key": run.idempotency_key,
                                    "emergency": False, "target_credential_type": None}
    # The next pass finds nothing: every key has an open run.
    assert detect_due(engine, now=T0 + 2 * DAY, pipeline=_pipeline(sent)).requested == []


def test_a_deprecated_type_migrates_and_a_failed_run_is_retried_in_a_batch(engine) -> None:  # type: ignore[no-untyped-def]
    cutoff = T0 + 10 * DAY
    spec = dict(ALLOY_SPEC, credential_types={
        "api_key": {"replacement": "pat", "deprecation": [{"phase": "amnesty", "from": cutoff.isoformat()}]}, "pat": {}})
    with session_scope(engine) as s:
        add_provider(s, "dep", spec)
        s.flush()
        refresh_next_due(s, add_key(s, "dep/key", "dep", max_age_s=365 * 86400, expiry_lead_time_s=7 * 86400), T0)
    _keys(engine, 1)
    sent: list[str] = []
    now = cutoff - 7 * DAY
    set_clock(lambda: now)
    first = detect_due(engine, now=now, pipeline=_pipeline(sent))
    assert len(first.requested) == 2
    with session_scope(engine) as s:
        runs = {r.reason: r for r in s.exec(select(RotationRun)).all()}
        assert runs["deprecation"].target_credential_type == "pat"
        for run in runs.values():  # both fail (and alert); the keys stay due
            run.state, run.finished_at = RunState.failed.value, now
            s.add(run)
    assert detect_due(engine, now=now + timedelta(minutes=14), pipeline=_pipeline(sent)).requested == []
    later = now + timedelta(minutes=15)
    set_clock(lambda: later)
    second = detect_due(engine, now=later, pipeline=_pipeline(sent))
    assert len(second.requested) == 2 and sent == first.requested + second.requested
    with session_scope(engine) as s:
        retries = s.exec(select(RotationRun).where(RotationRun.finished_at.is_(None))).all()  # type: ignore[union-attr]
    assert all(r.idempotency_key.endswith(":retry1") for r in retries)
    assert {r.target_credential_type for r in retries} == {"pat", None}


def test_one_bad_key_does_not_hold_back_the_batch(engine) -> None:  # type: ignore[no-untyped-def]
    _keys(engine, 4)
    with session_scope(engine) as s:  # someone used k0000's idempotency key for another key's run
        k0, k1 = (s.exec(select(ManagedKey).where(ManagedKey.name == n)).one() for n in ("alloy/k0000", "alloy/k0001"))
        s.add(RotationRun(id="squatter", key_id=k1.id, state=RunState.completed.value, trigger="manual", reason="manual",
                          requested_by="cli:test", idempotency_key=due_idempotency_key(k0.id, k0.next_due_at),
                          created_at=T0, updated_at=T0, finished_at=T0))
    sent: list[str] = []
    result = detect_due(engine, now=T0 + 2 * DAY, pipeline=_pipeline(sent))
    assert result.errors == {"alloy/k0000": "PermanentError"}
    assert len(result.requested) == 3 and sent == result.requested


def test_a_failed_batch_falls_back_to_one_transaction_per_key(engine) -> None:  # type: ignore[no-untyped-def]
    """The batch's writes roll back and send nothing; each key is then requested on its own."""
    _keys(engine, 5)

    def broken(session: Any, requests: Any, **kwargs: Any) -> Any:
        request_rotations(session, requests, **kwargs)  # written, then the transaction fails
        raise RuntimeError("connection lost")

    sent: list[str] = []
    pipeline = dataclasses.replace(_pipeline(sent), request_rotations=broken)
    result = detect_due(engine, now=T0 + 2 * DAY, pipeline=pipeline)
    with session_scope(engine) as s:
        runs = s.exec(select(RotationRun)).all()
        events = s.exec(select(AuditEvent.event).where(AuditEvent.run_id.is_not(None))).all()  # type: ignore[union-attr]
    assert len(runs) == 5 and sorted(sent) == sorted(result.requested) == sorted(r.id for r in runs)
    assert events == ["state_changed"] * 5


def test_two_batched_passes_at_once_make_one_run_per_key(engine) -> None:  # type: ignore[no-untyped-def]
    _keys(engine, 30)
    sent: list[list[str]] = [[], []]
    results: list[Any] = [None, None]

    def run(i: int) -> None:
        results[i] = detect_due(engine, now=T0 + 2 * DAY, pipeline=_pipeline(sent[i]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with session_scope(engine) as s:
        runs = s.exec(select(RotationRun)).all()
    assert len(runs) == 30 and len({r.key_id for r in runs}) == 30
    assert sorted(sent[0] + sent[1]) == sorted(r.id for r in runs)
    assert not results[0].errors and not results[1].errors
