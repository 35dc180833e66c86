"""Pipeline steps with in-memory fakes (Vault, provider, integrations) on SQLite, driven inline."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlmodel import Session, select

from tests.fakes_pipeline import FakeProvider, World, all_rows_text, states_in_audit
from worker.clock import as_utc
from worker.db.models import AuditEvent, KeyVersion, ManagedKey, RotationRun, SinkDelivery, VersionStage
from worker.protocol.states import RunState
from worker.db.session import session_scope
from worker.errors import PermanentError, RateLimited, StateConflict, TransientError
from worker.pipeline import steps
from worker.pipeline.runs import load_run, transition
from worker.pipeline.steps import common
from worker.protocol import Step

HAPPY = [(None, "requested"), ("requested", "issued"), ("issued", "prechecked"), ("prechecked", "promoted"),
         ("promoted", "propagated"), ("propagated", "verified"), ("verified", "retired"), ("retired", "completed")]


@pytest.fixture
def world(sqlite_url: str) -> World:
    return World(url=sqlite_url, provider=FakeProvider()).build()


def get_run(world: World, run_id: str) -> RotationRun:
    with Session(world.engine) as session:
        run = session.get(RotationRun, run_id)
        assert run is not None
        return run


def versions(world: World, run_id: str) -> tuple[KeyVersion | None, KeyVersion | None]:
    run = get_run(world, run_id)
    with Session(world.engine) as session:
        old = session.get(KeyVersion, run.old_version_id) if run.old_version_id else None
        new = session.get(KeyVersion, run.new_version_id) if run.new_version_id else None
        return old, new


def test_happy_path_overlap(world: World) -> None:
    run_id = world.request()
    assert world.drive(run_id) == RunState.completed
    run = get_run(world, run_id)
    assert run.finished_at is not None and run.last_error is None
    new_secret = world.provider.issued_secrets[0]
    assert len(world.provider.issued_secrets) == 1
    assert world.vault_value() == new_secret
    assert world.provider.is_valid(new_secret) and not world.provider.is_valid(world.old.secret)
    assert all(s.held == new_secret for s in world.integrations.values())
    old, new = versions(world, run_id)
    assert old.stage == VersionStage.retired and new.stage == VersionStage.current
    assert new.provider_key_name == f"keyrotor-{run_id}" and new.fingerprint.startswith("sha256:")
    assert run_id not in world.vault.staging  # staging discarded
    assert states_in_audit(world.engine, run_id) == HAPPY
    with Session(world.engine) as session:
        key = session.get(ManagedKey, run.key_id)
        assert key.last_rotated_at is not None
        sinks = session.exec(select(SinkDelivery).where(SinkDelivery.run_id == run_id)).all()
        assert sorted(s.status for s in sinks) == ["verified", "verified"]
    assert [e for e, _ in world.notifications] == ["succeeded"]


def test_old_key_revoked_only_after_verification_and_grace(world: World) -> None:
    """Invariant 2."""
    run_id = world.request()
    world.drive(run_id, stop_at={RunState.verified})
    run = get_run(world, run_id)
    assert run.state == RunState.verified
    grace_until = as_utc(run.grace_until)
    assert grace_until - world.clock.now == timedelta(seconds=3600)
    # Retire delivered early (duplicate/early message): it must not revoke, only reschedule.
    action = steps.execute(world.ctx, Step.retire, run_id)
    assert action.step == Step.retire and action.delay_ms == 3600 * 1000
    assert world.old.key_id not in world.provider.revoked_ids()
    world.clock.advance(3599)
    steps.execute(world.ctx, Step.retire, run_id)
    assert world.provider.is_valid(world.old.secret)
    world.clock.advance(1)
    assert world.drive(run_id) == RunState.completed
    assert world.provider.revoked_ids() == [world.old.key_id]


def test_failure_before_promotion_revokes_new_keeps_old(world: World) -> None:
    world.provider.activation_checks = 10_000  # the new key never goes live
    run_id = world.request()
    assert world.drive(run_id) == RunState.failed
    new_secret = world.provider.issued_secrets[0]
    assert not world.provider.is_valid(new_secret)
    assert world.provider.is_valid(world.old.secret)
    assert world.vault_value() == world.old.secret
    assert world.provider.revoked_ids() == ["k-2"]  # the new one, never the old one
    old, new = versions(world, run_id)
    assert new.stage == VersionStage.failed and old.stage == VersionStage.current
    assert "activation timeout" in get_run(world, run_id).last_error
    assert states_in_audit(world.engine, run_id)[-2:] == [("issued", "compensating"), ("compensating", "failed")]


def test_failure_after_promotion_restores_vault_and_sinks(world: World) -> None:
    world.integrations["svc-b"].faults.add("push", PermanentError("endpoint says 404"))
    run_id = world.request()
    assert world.drive(run_id) == RunState.rolled_back
    new_secret = world.provider.issued_secrets[0]
    assert world.vault_value() == world.old.secret
    assert len(world.vault.paths[("secret", "apps/acme/reporting")]) == 3  # old, new, old restored
    assert world.integrations["svc-a"].held == world.old.secret
    assert world.integrations["svc-a"].events[-1][0] == "rolled_back"
    assert not world.provider.is_valid(new_secret) and world.provider.is_valid(world.old.secret)
    old, new = versions(world, run_id)
    assert old.stage == VersionStage.current and old.vault_version == 3 and new.stage == VersionStage.failed
    assert ("propagated" not in {t for _, t in states_in_audit(world.engine, run_id)})
    assert ("promoted", "rolling_back") in states_in_audit(world.engine, run_id)
    assert [e for e, _ in world.notifications] == ["rolled_back"]


def test_duplicate_messages_end_in_same_state(world: World) -> None:
    """Invariant 7: every step delivered twice."""
    run_id = world.request()
    for step in (Step.issue, Step.issue, Step.precheck, Step.precheck, Step.promote, Step.promote,
                 Step.propagate, Step.propagate, Step.verify, Step.verify):
        steps.execute(world.ctx, step, run_id)
    world.clock.advance(3600)
    for step in (Step.retire, Step.retire, Step.finish, Step.finish, Step.compensate, Step.rollback):
        steps.execute(world.ctx, step, run_id)
    assert get_run(world, run_id).state == RunState.completed
    assert len(world.provider.issued_secrets) == 1
    assert world.provider.revoked_ids() == [world.old.key_id]
    assert world.integrations["svc-a"].events == [("rotated", world.integrations["svc-a"].events[0][1])]
    assert states_in_audit(world.engine, run_id) == HAPPY


def test_crash_after_staging_then_redelivery_never_issues_twice(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    world.provider.key_lifetime = timedelta(days=30)  # the provider's expiry must survive the crash
    run_id = world.request()
    real = common.transition  # every step's transition goes through steps.common.move_on
    calls = {"n": 0}

    def crash_once(*args, **kwargs):  # the process dies after Vault staging, before the DB commit
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("worker killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(common, "transition", crash_once)
    action = steps.execute(world.ctx, Step.issue, run_id)
    assert action.retry and get_run(world, run_id).state == RunState.requested
    assert world.drive(run_id) == RunState.completed
    assert len(world.provider.issued_secrets) == 1
    assert world.vault_value() == world.provider.issued_secrets[0]
    with session_scope(world.engine) as s:
        key = s.get(ManagedKey, get_run(world, run_id).key_id)
        expires = as_utc(key.expires_at)
    assert expires is not None and timedelta(days=29) < expires - datetime.now(timezone.utc) <= timedelta(days=30)


def test_retire_checks_what_vault_serves_even_when_staging_is_gone(world: World) -> None:
    """The old key is revoked only while Vault serves a new key that authenticates (invariants 1, 2)."""
    run_id = world.request()
    world.drive(run_id, stop_at={RunState.verified})
    world.vault.discard_pending(run_id)  # staging lost: retire must not assume the new key is fine
    new_key = next(k for k in world.provider.keys.values() if k.secret == world.vault_value())
    new_key.valid = False  # ... and the new key stopped authenticating during the grace period
    assert world.drive(run_id) == RunState.needs_attention
    assert world.provider.is_valid(world.old.secret) and world.old.key_id not in world.provider.revoked_ids()


def test_retire_refuses_when_vault_serves_something_else(world: World) -> None:
    run_id = world.request()
    world.drive(run_id, stop_at={RunState.verified})
    world.vault.paths[("secret", world.key.vault_path)].append({"api_key": "sk_hand_written_value"})
    assert world.drive(run_id) == RunState.needs_attention
    assert world.provider.is_valid(world.old.secret)
    assert "no longer serves the new credential" in (get_run(world, run_id).last_error or "")


def test_crash_after_issue_before_staging_revokes_the_stray_before_issuing_again(world: World) -> None:
    world.provider.faults.add("after_issue", RuntimeError("worker killed"))  # key exists, secret lost
    run_id = world.request()
    assert world.drive(run_id) == RunState.completed
    stray, fresh = world.provider.issued_secrets
    assert not world.provider.is_valid(stray) and world.provider.is_valid(fresh)
    assert world.vault_value() == fresh
    calls = [c for c, _ in world.provider.calls if c in ("issue", "revoke")]
    assert calls[:3] == ["issue", "revoke", "issue"]  # the stray is revoked before the run issues again
    with Session(world.engine) as session:
        events = {e.event: e.detail for e in session.exec(select(AuditEvent).where(AuditEvent.run_id == run_id)).all()}
    assert events["issue_outcome_unknown"]["name"] == f"keyrotor-{run_id}"
    assert events["stray_key_found"]["revocation"] == "revoked"


def test_crash_after_vault_promote_is_recovered(world: World) -> None:
    world.vault.faults.add("after_promote", TransientError("connection reset after write"))
    run_id = world.request()
    assert world.drive(run_id) == RunState.completed
    assert len(world.vault.paths[("secret", "apps/acme/reporting")]) == 2  # written once


def test_two_workers_racing_one_wins(world: World) -> None:
    run_id = world.request()
    with Session(world.engine, expire_on_commit=False) as s1:
        stale = load_run(s1, run_id)
    with session_scope(world.engine) as s2:
        transition(s2, load_run(s2, run_id), RunState.cancelled, actor="worker:a")
    with pytest.raises(StateConflict):
        with session_scope(world.engine) as s3:
            transition(s3, stale, RunState.issued, actor="worker:b")
    assert states_in_audit(world.engine, run_id) == [(None, "requested"), ("requested", "cancelled")]
    # A late step message for the moved run does nothing.
    assert steps.execute(world.ctx, Step.issue, run_id) == steps.Action()
    assert world.provider.issued_secrets == []


def test_rate_limited_retry_after_is_honoured(world: World) -> None:
    world.provider.faults.add("issue", RateLimited("429", retry_after=42))
    run_id = world.request()
    action = steps.execute(world.ctx, Step.issue, run_id, retry_count=0)
    assert action.retry and action.step == Step.issue
    assert 42_000 <= action.delay_ms <= 43_100
    run = get_run(world, run_id)
    assert run.attempts == 1 and "RateLimited" in run.last_error
    assert world.drive(run_id) == RunState.completed


def test_permanent_error_is_not_retried(world: World) -> None:
    world.provider.faults.always("issue", PermanentError("403: management token lacks scope"))
    run_id = world.request()
    assert world.drive(run_id) == RunState.failed
    from worker.db.models import AuditEvent
    with Session(world.engine) as session:
        retries = session.exec(select(AuditEvent).where(AuditEvent.event == "step_retry")).all()
    assert retries == []
    assert states_in_audit(world.engine, run_id)[1:] == [("requested", "compensating"), ("compensating", "failed")]
    assert world.provider.is_valid(world.old.secret)


def test_retries_exhausted_needs_attention(world: World) -> None:
    world.provider.faults.always("issue", TransientError("503 upstream"))
    run_id = world.request()
    assert world.drive(run_id) == RunState.needs_attention
    run = get_run(world, run_id)
    assert run.finished_at is None  # stays open: the key cannot rotate again until resolved
    assert world.vault_value() == world.old.secret and world.provider.is_valid(world.old.secret)
    assert [e for e, _ in world.notifications] == ["needs_attention"]
    from sqlmodel import select as sel
    from worker.db.models import AuditEvent
    with Session(world.engine) as session:
        retries = session.exec(sel(AuditEvent).where(AuditEvent.event == "step_retry")).all()
    assert len(retries) == world.ctx.policy.max_retries


def test_exhausted_after_promotion_rolls_back_first(world: World) -> None:
    world.integrations["svc-a"].report_stale = True  # never serves the new key
    run_id = world.request()
    assert world.drive(run_id) == RunState.rolled_back
    assert world.vault_value() == world.old.secret
    assert ("propagated", "rolling_back") in states_in_audit(world.engine, run_id)


def test_no_secret_in_logs_rows_or_errors(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    """Invariant 5 over one happy run, one rollback and one compensation."""
    import io

    from worker.log import configure_logging

    stream = io.StringIO()
    configure_logging("DEBUG", "json", stream=stream)
    world.drive(world.request())
    world.integrations["svc-b"].faults.add("push", PermanentError("refused"))
    world.drive(world.request(idempotency_key="second"))
    world.provider.activation_checks = 10_000
    world.drive(world.request(idempotency_key="third"))
    text = stream.getvalue() + all_rows_text(world.engine) + capsys.readouterr().out
    assert len(world.provider.issued_secrets) == 3 and "sk_" not in text
    for secret in world.provider.issued_secrets + [world.old.secret]:
        assert secret not in text
    assert "run.transition" in stream.getvalue()  # the log really was captured


def test_cutover_records_window_and_never_rolls_back(sqlite_url: str) -> None:
    world = World(url=sqlite_url, provider=FakeProvider(mode="cutover")).build()
    run_id = world.request()
    assert world.drive(run_id) == RunState.completed
    from sqlmodel import select as sel
    from worker.db.models import AuditEvent
    with Session(world.engine) as session:
        promoted = session.exec(sel(AuditEvent).where(AuditEvent.run_id == run_id, AuditEvent.to_state == "promoted")).one()
    assert "cutover_window_ms" in promoted.detail
    assert get_run(world, run_id).grace_until is not None
    assert world.old.key_id not in world.provider.revoked_ids()  # invalidated by the issue itself

    world.integrations["svc-a"].faults.add("push", PermanentError("refused"))
    run2 = world.request(idempotency_key="again")
    assert world.drive(run2) == RunState.needs_attention  # no rollback possible in cutover
    assert world.vault_value() == world.provider.issued_secrets[1]
    assert world.provider.is_valid(world.provider.issued_secrets[1])


def test_assisted_waits_for_deposit_then_completes(sqlite_url: str) -> None:
    from worker.pipeline.deposit import deposit
    from worker.secret import Secret

    world = World(url=sqlite_url, provider=FakeProvider(mode="assisted")).build()
    run_id = world.request()
    assert world.drive(run_id) == RunState.awaiting_deposit
    assert world.notifications[0][0] == "started"
    new = world.provider.add_existing("made-by-a-person")
    assert deposit(run_id=run_id, secret=Secret(new.secret), deposited_by="cli:alice", ctx=world.ctx,
                   enqueue=False) == RunState.issued
    assert world.drive(run_id) == RunState.completed
    assert world.vault_value() == new.secret and not world.provider.is_valid(world.old.secret)
    with pytest.raises(PermanentError):
        deposit(run_id=world.request(idempotency_key="x"), secret=Secret(new.secret), deposited_by="cli:bob",
                ctx=world.ctx, enqueue=False)


def test_compensation_finding_new_key_in_vault_rolls_back(world: World) -> None:
    run_id = world.request()
    world.drive(run_id, stop_at={RunState.promoted})
    # Simulate a run whose promotion was not recorded, then failed: it sits in compensating.
    with session_scope(world.engine) as session:
        run = load_run(session, run_id)
        session.execute(RotationRun.__table__.update().where(RotationRun.id == run_id).values(state="compensating"))
    assert world.drive(run_id) == RunState.rolled_back
    assert world.vault_value() == world.old.secret
    assert world.provider.is_valid(world.old.secret)


def test_one_open_run_per_key_and_idempotency(world: World) -> None:
    first = world.request(idempotency_key="abc")
    assert world.request(idempotency_key="abc") == first
    assert world.request() == first  # joins the open run
    world.drive(first)
    assert world.request() != first  # a finished run does not block a new one


def test_assisted_old_credential_the_provider_cannot_revoke_is_waited_for_with_a_deadline(sqlite_url: str) -> None:
    """No revoke API: the owner is asked to revoke the old credential; keyrotor polls, re-asks at the
    reminder interval, and past the revoke deadline (default 3 days) the run needs attention."""
    from worker.pipeline.deposit import deposit
    from worker.secret import Secret

    world = World(url=sqlite_url, provider=FakeProvider(mode="assisted", can_revoke=False)).build()
    run_id = world.request()
    assert world.drive(run_id) == RunState.awaiting_deposit
    new = world.provider.add_existing("made-by-a-person")
    deposit(run_id=run_id, secret=Secret(new.secret), deposited_by="cli:alice", ctx=world.ctx, enqueue=False)
    world.drive(run_id, stop_at={RunState.verified})
    world.clock.advance(3600)                                   # past the grace period
    action = steps.execute(world.ctx, Step.retire, run_id)
    assert action.step == Step.retire and action.delay_ms == 60_000   # polls every revoke_check_every
    assert get_run(world, run_id).state == RunState.verified
    asked = [d for e, d in world.notifications if e == "reminder" and d.get("action") == "revoke_old_credential"]
    assert len(asked) == 1 and asked[0]["credential_type"] == "api_key"
    world.clock.advance(86400)                                  # a day later: asked again
    steps.execute(world.ctx, Step.retire, run_id)
    assert len([d for e, d in world.notifications if d.get("action") == "revoke_old_credential"]) == 2
    world.clock.advance(2 * 86400)                              # 3 days after the first request
    steps.execute(world.ctx, Step.retire, run_id)
    run = get_run(world, run_id)
    assert run.state == RunState.needs_attention and "still authenticates" in (run.last_error or "")
    assert world.provider.is_valid(world.old.secret)           # nothing pretended it was revoked


def test_assisted_old_credential_revoked_by_the_owner_completes_the_run(sqlite_url: str) -> None:
    from worker.pipeline.deposit import deposit
    from worker.secret import Secret

    world = World(url=sqlite_url, provider=FakeProvider(mode="assisted", can_revoke=False)).build()
    run_id = world.request()
    world.drive(run_id)
    new = world.provider.add_existing("made-by-a-person")
    deposit(run_id=run_id, secret=Secret(new.secret), deposited_by="cli:alice", ctx=world.ctx, enqueue=False)
    world.drive(run_id, stop_at={RunState.verified})
    world.clock.advance(3600)
    steps.execute(world.ctx, Step.retire, run_id)
    world.provider.keys[world.old.key_id].valid = False         # the owner revoked it in the UI
    assert world.drive(run_id) == RunState.completed


def test_a_deposit_the_provider_rejects_is_refused_and_the_run_keeps_waiting(sqlite_url: str) -> None:
    from worker.pipeline.deposit import DepositRejected, deposit
    from worker.secret import Secret

    from worker.db.models import ProviderRecord

    world = World(url=sqlite_url, provider=FakeProvider(mode="assisted")).build()
    with session_scope(world.engine) as session:   # a deposit not live is re-checked up to the activation timeout
        record = session.exec(select(ProviderRecord)).one()
        record.spec = {"activation": {"poll_interval": "1s", "timeout": "2s"}}
        session.add(record)
    run_id = world.request()
    world.drive(run_id)
    with pytest.raises(DepositRejected, match="rejects this credential"):
        deposit(run_id=run_id, secret=Secret("typo-not-a-key"), deposited_by="cli:alice", ctx=world.ctx, enqueue=False)
    assert get_run(world, run_id).state == RunState.awaiting_deposit
    assert run_id not in world.vault.staging


def test_a_pending_integration_polls_verify_without_using_retries_or_asking_the_provider(world: World) -> None:
    """A sink still taking the key up (a Kubernetes rollout) answers ``pending``: verify comes back
    after ``retry_in_s`` as a fresh message, attempts stay 0, the reconciler's deadline moves past
    the next look, and the provider is asked only once every sink is ok."""
    from worker.integrations.base import VerifyResult, VerifyStatus

    run_id = world.request()
    world.drive(run_id, stop_at={RunState.propagated})
    sink = next(iter(world.integrations.values()))
    answers = [VerifyResult(VerifyStatus.pending, None, "rolling out", retry_in_s=7.0)] * 3
    real_verify = sink.verify
    sink.verify = lambda ann: answers.pop() if answers else real_verify(ann)  # type: ignore[method-assign]
    checks_before = sum(1 for call, _ in world.provider.calls if call == "check")
    for _ in range(3):
        action = steps.execute(world.ctx, Step.verify, run_id)
        assert (action.step, action.delay_ms, action.retry) == (Step.verify, 7000, False)
        run = get_run(world, run_id)
        assert RunState(run.state) == RunState.propagated and run.attempts == 0
        assert as_utc(run.step_deadline_at) > world.clock.now + timedelta(seconds=7)  # type: ignore[operator]
    assert sum(1 for call, _ in world.provider.calls if call == "check") == checks_before
    steps.execute(world.ctx, Step.verify, run_id)
    assert RunState(get_run(world, run_id).state) == RunState.verified
    assert sum(1 for call, _ in world.provider.calls if call == "check") == checks_before + 1
