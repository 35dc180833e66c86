"""Operator resolution of runs that need attention (worker.pipeline.resolve), on SQLite and
PostgreSQL: retry / compensate / rollback / cancel, validated by the state machine, audited with
the operator, step enqueued only after commit."""

from __future__ import annotations

import pytest
from dramatiq import Message, get_broker
from sqlmodel import Session, select

from tests.fakes_pipeline import FakeProvider, World
from worker.db.models import AuditEvent, RotationRun
from worker.protocol.states import RunState
from worker.db.session import session_scope
from worker.errors import PermanentError, TransientError
from worker.pipeline.resolve import ResolveRefused, allowed_actions, resolve_run

pytestmark = pytest.mark.integration

OPERATOR = "user:alice"


@pytest.fixture
def world(db_url: str) -> World:
    from worker.runtime.broker import make_stub_broker, setup_broker

    setup_broker(broker=make_stub_broker())
    return World(url=db_url, provider=FakeProvider()).build()


def queued() -> list[tuple[str, str]]:
    queue = get_broker().queues["rotation"].queue  # type: ignore[attr-defined]
    return [(m.actor_name, m.args[0]) for m in (Message.decode(raw) for raw in list(queue))]


def run_of(world: World, run_id: str) -> RotationRun:
    with Session(world.engine) as session:
        run = session.get(RotationRun, run_id)
        assert run is not None
        return run


def resolve(world: World, run_id: str, action: str) -> RotationRun:
    with session_scope(world.engine) as session:
        return resolve_run(session, run_id, action, OPERATOR, vault=world.vault)


def stuck_before_issue(world: World) -> str:
    world.provider.faults.always("issue", TransientError("503 upstream"))
    run_id = world.request()
    assert world.drive(run_id) == RunState.needs_attention
    world.provider.faults.clear("issue")
    return run_id


def stuck_after_issue(world: World) -> str:
    world.provider.faults.always("check", TransientError("503 upstream"))
    run_id = world.request()
    assert world.drive(run_id) == RunState.needs_attention
    world.provider.faults.clear("check")
    return run_id


def stuck_after_promotion(world: World) -> str:
    run_id = world.request()
    world.drive(run_id, stop_at={RunState.verified})
    world.clock.advance(3600)
    world.provider.faults.always("check", TransientError("503 upstream"))
    assert world.drive(run_id) == RunState.needs_attention  # retire: exhausted → needs_attention
    world.provider.faults.clear("check")
    return run_id


def test_retry_resumes_where_it_stopped_audited_and_enqueued_after_commit(world: World) -> None:
    run_id = stuck_before_issue(world)
    assert run_of(world, run_id).attempts > 0
    get_broker().flush_all()
    with session_scope(world.engine) as session:
        run = resolve_run(session, run_id, "retry", OPERATOR, vault=world.vault, note="provider outage over")
        assert queued() == []  # not before the commit
    assert run.state == RunState.requested
    fresh = run_of(world, run_id)
    assert fresh.attempts == 0 and fresh.last_error is None and fresh.state == RunState.requested
    assert queued() == [("step_issue", run_id)]
    with Session(world.engine) as session:
        event = session.exec(select(AuditEvent).where(AuditEvent.run_id == run_id, AuditEvent.event == "state_changed")
                             .order_by(AuditEvent.id.desc())).first()
    assert (event.actor, event.from_state, event.to_state) == (OPERATOR, "needs_attention", "requested")
    assert event.detail["resolution"] == "retry" and event.detail["stopped_in"] == "requested"
    assert event.detail["note"] == "provider outage over" and "503" in event.detail["previous_error"]
    assert world.drive(run_id) == RunState.completed


def test_rolled_back_transaction_enqueues_nothing(world: World) -> None:
    run_id = stuck_before_issue(world)
    get_broker().flush_all()
    with Session(world.engine) as session:
        resolve_run(session, run_id, "retry", OPERATOR, vault=world.vault)
        session.rollback()
    assert queued() == [] and run_of(world, run_id).state == RunState.needs_attention


def test_cancel_after_promotion_is_refused_rollback_restores(world: World) -> None:
    run_id = stuck_after_promotion(world)
    with Session(world.engine) as session:
        # revoked-by-person: the run stopped retiring; a person may have revoked the old key by hand.
        assert allowed_actions(session, run_id, vault=world.vault) == {"retry": "verified", "rollback": "rolling_back",
                                                                       "revoked-by-person": "retired"}
    for action in ("cancel", "compensate"):
        with pytest.raises(ResolveRefused) as info:
            resolve(world, run_id, action)
        message = str(info.value)
        assert "Vault" in message and "retry (→ verified)" in message and "rollback (→ rolling_back)" in message
    assert run_of(world, run_id).state == RunState.needs_attention
    new_secret = world.provider.issued_secrets[0]
    assert resolve(world, run_id, "rollback").state == RunState.rolling_back
    assert world.drive(run_id) == RunState.rolled_back
    assert world.vault_value() == world.old.secret
    assert not world.provider.is_valid(new_secret) and world.provider.is_valid(world.old.secret)


def test_retry_after_promotion_completes(world: World) -> None:
    run_id = stuck_after_promotion(world)
    assert resolve(world, run_id, "retry").state == RunState.verified
    assert world.drive(run_id) == RunState.completed
    assert not world.provider.is_valid(world.old.secret)


def test_cancel_with_an_issued_key_compensates_first(world: World) -> None:
    run_id = stuck_after_issue(world)
    new_secret = world.provider.issued_secrets[0]
    with Session(world.engine) as session:
        assert allowed_actions(session, run_id, vault=world.vault) == {
            "retry": "issued", "compensate": "compensating", "cancel": "compensating"}
    assert resolve(world, run_id, "cancel").state == RunState.compensating
    assert world.drive(run_id) == RunState.failed
    assert not world.provider.is_valid(new_secret)      # nothing issued is left behind
    assert world.vault_value() == world.old.secret


def test_cancel_with_nothing_issued_ends_the_run(world: World) -> None:
    run_id = stuck_before_issue(world)
    run = resolve(world, run_id, "cancel")
    assert run.state == RunState.cancelled and run_of(world, run_id).finished_at is not None
    assert world.provider.issued_secrets == []
    assert world.request() != run_id  # the key is free for a new run (one open run per key)


def test_cancel_with_a_staged_but_unrecorded_key_compensates(world: World) -> None:
    run_id = stuck_before_issue(world)
    from worker.secret import Secret

    world.vault.stage_pending(run_id, Secret("sk_live_lost"), "k-99")  # a crashed attempt staged it
    assert resolve(world, run_id, "cancel").state == RunState.compensating


def test_refusals(world: World) -> None:
    run_id = world.request()
    with pytest.raises(ResolveRefused, match="not needs_attention"):
        resolve(world, run_id, "retry")
    with pytest.raises(ResolveRefused, match="unknown action"):
        resolve(world, run_id, "explode")
    with pytest.raises(ResolveRefused, match="no run"):
        resolve(world, "nope", "retry")
    assert issubclass(ResolveRefused, PermanentError)


def test_cutover_never_revokes_the_only_key(db_url: str) -> None:
    from worker.runtime.broker import make_stub_broker, setup_broker

    setup_broker(broker=make_stub_broker())
    world = World(url=db_url, provider=FakeProvider(mode="cutover")).build()
    run_id = stuck_after_issue(world)
    with Session(world.engine) as session:
        assert allowed_actions(session, run_id, vault=world.vault) == {"retry": "issued"}
    for action in ("cancel", "compensate", "rollback"):
        with pytest.raises(ResolveRefused, match="cutover"):
            resolve(world, run_id, action)
    assert resolve(world, run_id, "retry").state == RunState.issued
    assert world.drive(run_id) == RunState.completed
