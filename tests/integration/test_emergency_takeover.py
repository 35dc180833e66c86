"""An emergency takes over a key's run that waits for a person, and never ends quietly: on SQLite
and PostgreSQL (the one-open-run index and conditional updates are the database's)."""

from __future__ import annotations

from typing import Iterator

import pytest
from sqlmodel import Session, select

from tests.fakes_pipeline import FakeProvider, World, states_in_audit
from worker.db.models import AuditEvent, KeyVersion, RotationRun, VersionStage
from worker.protocol.states import RunState
from worker.db.session import session_scope
from worker.errors import PermanentError, TransientError
from worker.pipeline.resolve import allowed_actions, resolve_run

pytestmark = pytest.mark.integration

SECURITY = "cli:security"


def make_world(db_url: str, mode: str = "overlap") -> World:
    """A world whose context is the process's (as in a worker: the takeover reads its Vault's staging)."""
    from worker.runtime.broker import make_stub_broker, setup_broker
    from worker.pipeline.context import configure

    setup_broker(broker=make_stub_broker())
    built = World(url=db_url, provider=FakeProvider(mode=mode)).build()
    configure(built.ctx)
    return built


@pytest.fixture(autouse=True)
def _reset_context() -> Iterator[None]:
    from worker.pipeline.context import configure

    yield
    configure(None)


@pytest.fixture
def world(db_url: str) -> World:
    return make_world(db_url)


def emergency(world: World, batch: str = "b1") -> list[tuple[RotationRun, bool]]:
    from worker.service.emergency import request_provider_rotation

    with session_scope(world.engine) as session:
        runs = request_provider_rotation(session, provider=world.provider.name, requested_by=SECURITY, batch_id=batch)
        return [(session.get(RotationRun, r.id), created) for r, created in runs]


def run_of(world: World, run_id: str) -> RotationRun:
    with Session(world.engine) as session:
        run = session.get(RotationRun, run_id)
        assert run is not None
        return run


def takeover_detail(world: World, run_id: str) -> dict:
    with Session(world.engine) as session:
        events = session.exec(select(AuditEvent).where(AuditEvent.run_id == run_id, AuditEvent.actor == SECURITY,
                                                       AuditEvent.event == "state_changed")).all()
    assert len(events) == 1, events
    assert events[0].detail["resolution"] == "emergency_takeover"
    return dict(events[0].detail)


def test_a_needs_attention_run_with_nothing_issued_is_cancelled_and_replaced(world: World) -> None:
    world.provider.faults.always("issue", TransientError("503 upstream"))
    stuck = world.request()
    assert world.drive(stuck) == RunState.needs_attention
    world.provider.faults.clear("issue")

    [(fresh, created)] = emergency(world)
    assert created and fresh.id != stuck and fresh.emergency
    assert run_of(world, stuck).state == RunState.cancelled
    assert takeover_detail(world, stuck)["stopped_in"] == "requested"
    assert world.drive(fresh.id) == RunState.completed
    assert world.old is not None and not world.provider.keys[world.old.key_id].valid   # the exposed key: revoked
    verified = [d for (f, t), d in zip(states_in_audit(world.engine, fresh.id), _details(world, fresh.id)) if t == "verified"]
    assert verified[0]["grace_s"] == 0.0                                               # no grace in a breach


def _details(world: World, run_id: str) -> list[dict]:
    with Session(world.engine) as session:
        return [dict(e.detail or {}) for e in session.exec(
            select(AuditEvent).where(AuditEvent.run_id == run_id, AuditEvent.event == "state_changed").order_by(AuditEvent.id)).all()]


def test_a_needs_attention_run_with_an_issued_key_resumes_as_an_emergency(world: World) -> None:
    world.provider.faults.always("check", TransientError("503 upstream"))
    stuck = world.request()
    assert world.drive(stuck) == RunState.needs_attention      # precheck ran out of retries: new key staged
    world.provider.faults.clear("check")
    issued_before = len(world.provider.keys)

    [(run, created)] = emergency(world)
    assert not created and run.id == stuck and run.emergency and run.state == RunState.issued
    assert takeover_detail(world, stuck)["resumed_as_emergency"] is True
    assert world.drive(stuck) == RunState.completed
    assert len(world.provider.keys) == issued_before             # the staged key was used, no second one
    assert world.old is not None and not world.provider.keys[world.old.key_id].valid


def test_a_run_awaiting_a_deposit_is_replaced_by_an_emergency_run(db_url: str) -> None:
    world = make_world(db_url, mode="assisted")
    waiting = world.request()
    assert world.drive(waiting) == RunState.awaiting_deposit

    [(fresh, created)] = emergency(world)
    assert created and fresh.emergency and run_of(world, waiting).state == RunState.cancelled
    assert world.drive(fresh.id) == RunState.awaiting_deposit   # the owner is asked again, as an emergency
    # Repeating the same emergency (same batch) joins its own run: no second takeover.
    [(again, created_again)] = emergency(world)
    assert again.id == fresh.id and not created_again


def test_resolve_cancels_a_run_awaiting_a_deposit(db_url: str) -> None:
    world = make_world(db_url, mode="assisted")
    waiting = world.request()
    assert world.drive(waiting) == RunState.awaiting_deposit
    with Session(world.engine) as session:
        assert allowed_actions(session, waiting, vault=world.vault) == {"cancel": "cancelled"}
    with session_scope(world.engine) as session:
        with pytest.raises(PermanentError, match="only action is cancel"):
            resolve_run(session, waiting, "retry", "user:alice", vault=world.vault)
    with session_scope(world.engine) as session:
        resolve_run(session, waiting, "cancel", "user:alice", vault=world.vault, note="owner left")
    run = run_of(world, waiting)
    assert run.state == RunState.cancelled and run.finished_at is not None   # --prune is no longer blocked
    assert states_in_audit(world.engine, waiting)[-1] == ("awaiting_deposit", "cancelled")


def test_an_emergency_that_fails_before_promotion_needs_attention_not_failed(world: World) -> None:
    """An independent provider answers 400 to the issue call: the key keeps its exposed credential,
    so the run stops in needs_attention with an emergency alert (was: compensated → failed)."""
    world.provider.faults.always("issue", PermanentError("400 Bad Request"))
    [(run, created)] = emergency(world)
    assert created
    assert world.drive(run.id) == RunState.needs_attention
    assert states_in_audit(world.engine, run.id) == [(None, "requested"), ("requested", "needs_attention")]
    alerts = [d for event, d in world.notifications if event == "needs_attention" and d["run_id"] == run.id]
    assert alerts and alerts[0]["emergency"] is True and "exposed credential" in alerts[0]["action"]
    assert world.old is not None and world.provider.keys[world.old.key_id].valid
    with Session(world.engine) as session:
        assert set(allowed_actions(session, run.id, vault=world.vault)) >= {"retry", "cancel"}
    # Fixed, the person retries and the emergency completes.
    world.provider.faults.clear("issue")
    with session_scope(world.engine) as session:
        resolve_run(session, run.id, "retry", "user:alice", vault=world.vault)
    assert world.drive(run.id) == RunState.completed


def test_a_run_that_cannot_be_taken_over_is_reported(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run whose stop state is unknown but holds an issued key: neither cancelled nor resumed,
    so the emergency reports it and alerts through the applied inventory's sinks."""
    from datetime import datetime, timezone

    alerts: list[tuple[str, dict]] = []
    monkeypatch.setattr("worker.notify.notify_function", lambda engine, *a, **k: (
        lambda event, *, key_name, run_id, detail=None: alerts.append((event, {"run_id": run_id, **(detail or {})}))))

    assert world.key is not None
    now = datetime.now(timezone.utc)
    with session_scope(world.engine) as session:
        version = KeyVersion(key_id=world.key.id, run_id="stuck1", credential_type="api_key",
                             stage=VersionStage.pending, provider_key_id="k-x", fingerprint="sha256:00")
        session.add(version)
        session.flush()
        session.add(RotationRun(id="stuck1", key_id=world.key.id, state=RunState.needs_attention, trigger="manual",
                                requested_by="t", created_at=now, new_version_id=version.id, last_error="?"))
    from worker.service.emergency import not_rotated

    runs = emergency(world)
    assert [(r.id, c) for r, c in runs] == [("stuck1", False)]
    assert [r.id for r in not_rotated([r for r, _ in runs])] == ["stuck1"]
    assert [(event, d["run_id"], d["emergency"]) for event, d in alerts] == [("needs_attention", "stuck1", True)]
    assert run_of(world, "stuck1").state == RunState.needs_attention
