"""Calls with an unknown outcome and retry bounds, with the in-memory fakes on SQLite: staging is
checked against the fingerprint recorded at issue, revocations report the provider's answer, and
a step's retry budget is the run's, whoever re-enqueues it."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlmodel import Session, select

from worker.service.reconcile import recover_stuck_runs
from tests.fakes_pipeline import FakeProvider, World
from tests.scheduler_fakes import RecordingPipeline
from worker.clock import utcnow
from worker.db.models import AuditEvent, RotationRun
from worker.protocol.states import RunState
from worker.db.session import session_scope
from worker.errors import PermanentError
from worker.pipeline.steps import execute
from worker.pipeline.context import StepPolicy
from worker.protocol import Step
from worker.vault.errors import VaultUnavailable

POLICY = StepPolicy(max_retries=3, min_backoff_ms=1000, max_backoff_ms=8000, time_limit_ms=30_000,
                    activation_poll_s=2, activation_timeout_s=60, revocation_timeout_s=30)


@pytest.fixture
def world(sqlite_url: str) -> World:
    return World(url=sqlite_url, provider=FakeProvider()).build(policy=POLICY)


def _events(world: World, run_id: str, event: str) -> list[AuditEvent]:
    with Session(world.engine) as session:
        return list(session.exec(select(AuditEvent).where(AuditEvent.run_id == run_id, AuditEvent.event == event)
                                 .order_by(AuditEvent.id)).all())


def _run(world: World, run_id: str) -> RotationRun:
    with Session(world.engine) as session:
        run = session.get(RotationRun, run_id)
        assert run is not None
        return run


def test_promote_refuses_a_staged_secret_other_than_the_one_recorded_at_issue(world: World) -> None:
    """A staging write that timed out earlier and lands late replaces the staged secret: promote
    used to write whatever staging held into the key's Vault path."""
    run_id = world.request()
    assert world.drive(run_id, stop_at={RunState.prechecked}) == RunState.prechecked
    stale = world.provider.add_existing("keyrotor-" + run_id)   # a key this run gave up on (revoked)
    stale.valid = False
    world.vault.staging[run_id] = (stale.secret, stale.key_id)   # ... its held staging write lands now
    assert world.drive(run_id) == RunState.failed
    assert world.vault_value() == world.old.secret               # the stale key never reached Vault
    assert world.provider.is_valid(world.old.secret)
    failure = [e for e in _events(world, run_id, "state_changed") if e.to_state == "compensating"][0]
    assert "other than the one recorded at issue" in failure.detail["error"]


def test_precheck_refuses_a_staged_secret_other_than_the_one_recorded_at_issue(world: World) -> None:
    run_id = world.request()
    assert world.drive(run_id, stop_at={RunState.issued}) == RunState.issued
    world.vault.staging[run_id] = ("sk_live_something_else", None)
    assert world.drive(run_id) == RunState.failed
    assert world.vault_value() == world.old.secret
    assert not any(call == "check" for call, _ in world.provider.calls)  # never polled the wrong key


def test_the_issue_step_rejects_staging_that_holds_a_key_it_discarded(world: World) -> None:
    """The defect: staging timed out, the key was revoked, the held write landed, and the next
    attempt recovered the revoked key from staging, prechecked it for the whole activation timeout
    and compensated (the run failed)."""
    held: list[tuple[str, str | None]] = []
    original = world.vault.stage_pending

    def stage_times_out_then_lands(run_id, secret, key_id, expires_at=None):  # type: ignore[no-untyped-def]
        if not held:
            held.append((secret.reveal(), key_id))
            raise VaultUnavailable("staging write timed out (it lands later)")
        return original(run_id, secret, key_id, expires_at)

    world.vault.stage_pending = stage_times_out_then_lands  # type: ignore[method-assign]
    run_id = world.request()
    assert world.ctx is not None
    action = execute(world.ctx, Step.issue, run_id)
    assert action.retry
    first_secret, first_id = held[0]
    assert not world.provider.is_valid(first_secret)               # known not staged: revoked
    world.vault.staging[run_id] = (first_secret, first_id)         # the held write lands now
    assert world.drive(run_id) == RunState.completed
    assert world.vault_value() not in (first_secret, world.old.secret)
    assert world.provider.is_valid(world.vault_value() or "")
    rejected = _events(world, run_id, "staging_rejected")
    assert [e.detail["provider_key_id"] for e in rejected] == [first_id]
    discarded = _events(world, run_id, "new_key_discarded")
    assert [e.detail["revocation"] for e in discarded] == ["revoked"]


def test_compensation_reports_a_404_as_already_gone_not_revoked(world: World) -> None:
    world.provider.faults.always("check", PermanentError("403: this account may not call /me"))
    run_id = world.request()
    assert world.drive(run_id, stop_at={RunState.compensating}) == RunState.compensating
    new_secret = world.provider.issued_secrets[0]
    world.provider._find(new_secret).valid = False  # type: ignore[union-attr]  # revoked meanwhile
    assert world.drive(run_id) == RunState.failed
    failed = [e for e in _events(world, run_id, "state_changed") if e.to_state == "failed"][0]
    assert failed.detail["revocation"] == "already_gone"


def test_a_steps_retry_budget_is_the_runs_whoever_re_enqueues_it(world: World) -> None:
    """The defect: a reconciler re-enqueue (a fresh Dramatiq message, retries=0) started a new
    retry chain: 5 promote attempts against a limit of 4."""
    run_id = world.request()
    assert world.drive(run_id, stop_at={RunState.prechecked}) == RunState.prechecked
    world.vault.faults.always("promote", VaultUnavailable("503: Vault is sealed"))
    assert world.ctx is not None
    executions = 0
    for _ in range(10):  # every message fresh, as the reconciler or a duplicate delivery sends it
        action = execute(world.ctx, Step.promote, run_id, retry_count=0)
        executions += 1
        if not action.retry:
            break
    assert executions == POLICY.max_retries + 1
    assert _run(world, run_id).state == RunState.needs_attention.value
    assert len(_events(world, run_id, "step_retry")) == POLICY.max_retries
    assert world.vault_value() == world.old.secret


def test_the_reconciler_counts_its_own_re_enqueues_not_the_steps_retries(world: World) -> None:
    """The defect: the reconciler read the step's failure count as its own, so "no progress after
    5 re-enqueues" was reported after 2."""
    run_id = world.request()
    with session_scope(world.engine) as session:
        run = session.get(RotationRun, run_id)
        assert run is not None
        run.attempts = 3  # three failed executions of the step so far, retried by Dramatiq
        run.step_deadline_at = utcnow() - timedelta(seconds=1)
        session.add(run)
    pipeline = RecordingPipeline()
    now = utcnow()
    for requeue in range(1, 4):
        now += timedelta(hours=1)
        result = recover_stuck_runs(world.engine, now=now, max_attempts=3, pipeline=pipeline.as_pipeline(),
                                    notify=lambda *a, **k: None)
        assert result.requeued == [run_id], f"re-enqueue {requeue}"
    now += timedelta(hours=1)
    result = recover_stuck_runs(world.engine, now=now, max_attempts=3, pipeline=pipeline.as_pipeline(),
                                notify=lambda *a, **k: None)
    assert result.needs_attention == [run_id]
    run = _run(world, run_id)
    assert run.last_error is not None and "after 3 re-enqueues" in run.last_error
    assert run.attempts == 3  # the step's own count is untouched by the reconciler
