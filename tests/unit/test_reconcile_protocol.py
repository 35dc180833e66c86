"""The reconciler moves stuck runs only as the protocol allows, through the one transition function.

For every mode and every state a step acts on, a run that is out of re-enqueues is recovered;
every ``state_changed`` event the reconciler writes must be a transition the protocol allows in
that run's mode, the run must land on the protocol's failure target, its lease must be cleared,
and it is enqueued exactly when the protocol has a next step for it (SQLite).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, Iterator

import pytest
from sqlmodel import select

from tests.scheduler_fakes import ALLOY_SPEC, RecordingPipeline, add_key, add_provider
from worker.clock import set_clock
from worker.db.models import AuditEvent, RotationRun
from worker.db.session import make_engine, session_scope
from worker.metrics import ROTATIONS
from worker.protocol import FailureKind, Mode, RunState, can_transition, failure_target, happy_path, next_step
from worker.protocol.states import TERMINAL_STATES, WAITING_STATES
from worker.service.reconcile import recover_stuck_runs

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
MAX_ATTEMPTS = 2

#: Every state the reconciler can find stuck: a step acts on it (not over, not waiting for a person).
STUCK = {mode: [s for s in (*happy_path(mode), RunState.compensating, RunState.rolling_back)
                if s not in TERMINAL_STATES and s not in WAITING_STATES]
         for mode in Mode}
CASES = [(mode, state, emergency) for mode in Mode for state in STUCK[mode] for emergency in (False, True)]


@pytest.fixture
def engine(sqlite_url: str) -> Iterator[Any]:
    eng = make_engine(sqlite_url)
    set_clock(lambda: NOW)
    with session_scope(eng) as s:
        for mode in Mode:
            add_provider(s, f"p-{mode.value}", {**ALLOY_SPEC, "mode": mode.value})
    yield eng
    eng.dispose()


def _stuck_run(engine: Any, mode: Mode, state: RunState, emergency: bool) -> str:
    run_id = f"run-{mode.value}-{state.value}-{int(emergency)}"
    with session_scope(engine) as s:
        key = add_key(s, f"k/{run_id}", f"p-{mode.value}")
        s.flush()
        s.add(RotationRun(id=run_id, key_id=key.id, state=state.value, mode=mode.value, emergency=emergency,
                          trigger="schedule", requested_by="scheduler", created_at=NOW - timedelta(hours=2),
                          updated_at=NOW - timedelta(hours=1), step_deadline_at=NOW - timedelta(minutes=1),
                          requeues=MAX_ATTEMPTS, lease_owner="worker-that-died",
                          lease_until=NOW - timedelta(minutes=5), grace_until=NOW - timedelta(minutes=30)))
    return run_id


@pytest.mark.parametrize(("mode", "state", "emergency"), CASES,
                         ids=[f"{m.value}-{s.value}-{'emergency' if e else 'scheduled'}" for m, s, e in CASES])
def test_stuck_run_moves_only_as_the_protocol_allows(engine: Any, mode: Mode, state: RunState, emergency: bool) -> None:
    run_id = _stuck_run(engine, mode, state, emergency)
    pipeline = RecordingPipeline()
    alerts: list[str] = []
    result = recover_stuck_runs(engine, now=NOW, max_attempts=MAX_ATTEMPTS, pipeline=pipeline.as_pipeline(),
                                notify=lambda event, **_: alerts.append(event))

    with session_scope(engine) as s:
        run = s.get(RotationRun, run_id)
        assert run is not None
        moves = [(RunState(e.from_state), RunState(e.to_state)) for e in s.exec(
            select(AuditEvent).where(AuditEvent.run_id == run_id, AuditEvent.event == "state_changed")).all()]
    expected = failure_target(mode, state, FailureKind.exhausted, emergency=emergency)
    assert moves == [(state, expected)]
    for from_state, to_state in moves:
        assert can_transition(mode, from_state, to_state), f"{mode.value}: {from_state.value} → {to_state.value}"
    assert run.state == expected.value
    assert run.lease_owner is None and run.lease_until is None  # the dead worker's lease went with the move
    assert run.requeues == MAX_ATTEMPTS and "re-enqueues" in (run.last_error or "")
    if next_step(mode, expected) is None:  # waits for a person: alerted, not enqueued, no deadline
        assert result.needs_attention == [run_id] and alerts == ["needs_attention"]
        assert pipeline.enqueued == [] and run.step_deadline_at is None
    else:  # the failure path has a step of its own (rollback, compensation): it is sent
        assert result.failed_over == [run_id] and alerts == []
        assert pipeline.enqueued == [run_id] and run.step_deadline_at is not None


def test_overlap_after_promotion_rolls_back_instead_of_a_forbidden_needs_attention(engine: Any) -> None:
    """The case the raw UPDATE got wrong: promoted/propagated → needs_attention is not a transition
    of the protocol in overlap or assisted mode; restoring the old key (still valid) is."""
    for mode in (Mode.overlap, Mode.assisted):
        for state in (RunState.promoted, RunState.propagated):
            assert not can_transition(mode, state, RunState.needs_attention)
            _stuck_run(engine, mode, state, False)
    result = recover_stuck_runs(engine, now=NOW, max_attempts=MAX_ATTEMPTS, pipeline=RecordingPipeline().as_pipeline(),
                                notify=lambda *a, **k: None)
    assert len(result.failed_over) == 4 and result.needs_attention == []
    with session_scope(engine) as s:
        states = {r.state for r in s.exec(select(RotationRun)).all()}
    assert states == {RunState.rolling_back.value}


def test_needs_attention_is_counted_once_the_move_commits(engine: Any) -> None:
    run_id = _stuck_run(engine, Mode.cutover, RunState.promoted, False)
    counter = ROTATIONS.labels(provider="p-cutover", outcome=RunState.needs_attention.value)
    before = counter._value.get()
    result = recover_stuck_runs(engine, now=NOW, max_attempts=MAX_ATTEMPTS, pipeline=RecordingPipeline().as_pipeline(),
                                notify=lambda *a, **k: None)
    assert result.needs_attention == [run_id]
    assert counter._value.get() == before + 1
    # a second pass finds nothing stuck: no second count
    recover_stuck_runs(engine, now=NOW, max_attempts=MAX_ATTEMPTS, pipeline=RecordingPipeline().as_pipeline(),
                       notify=lambda *a, **k: None)
    assert counter._value.get() == before + 1
