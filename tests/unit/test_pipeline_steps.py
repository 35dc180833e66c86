"""Pipeline steps with in-memory fakes (Vault, provider, integrations) on SQLite, driven inline."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlmodel import Session, select

from tests.fakes_pipeline import FakeProvider, World, all_rows_text, states_in_audit
from worker.clock import as_utc
from worker.db.models import KeyVersion, ManagedKey, RotationRun, RunState, SinkDelivery, VersionStage
from worker.db.session import session_scope
from worker.errors import PermanentError, RateLimited, StateConflict, TransientError
from worker.pipeline import steps
from worker.pipeline.runs import load_run, transition
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
