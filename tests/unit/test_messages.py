"""The versioned rotation-request message: validation, rejection, idempotency, joining."""

from __future__ import annotations

import json

import pytest
from sqlmodel import Session, select

from tests.fakes_pipeline import FakeProvider, World
from worker.db.models import AuditEvent, RotationRun
from worker.protocol.states import RunState
from worker.pipeline.messages import MalformedMessage, consume, parse_request

VALID = {"version": 1, "key": "acme/reporting", "reason": "manual", "requested_by": "ci:deploy",
         "idempotency_key": "deploy-1", "not_before": None, "emergency": False}


@pytest.fixture
def world(sqlite_url: str) -> World:
    from worker.runtime.broker import make_stub_broker, setup_broker

    setup_broker(broker=make_stub_broker())
    return World(url=sqlite_url, provider=FakeProvider()).build()


def test_valid_message_parses() -> None:
    req = parse_request(json.dumps({**VALID, "not_before": "2026-01-01T00:00:00Z"}))
    assert req.key == "acme/reporting" and req.not_before.tzinfo is not None


@pytest.mark.parametrize("raw, code", [
    ("{not json", "not_json"),
    ("[1, 2]", "not_object"),
    ({**VALID, "version": 2}, "bad_version"),
    ({**VALID, "key": None}, "invalid"),
    ({**VALID, "colour": "blue"}, "invalid"),
    ({**VALID, "requested_by": ""}, "invalid"),
    ({**VALID, "not_before": "2026-01-01T00:00:00"}, "invalid"),
    ({**{k: v for k, v in VALID.items() if k != "key"}, "provider": "acme", "all": True}, "invalid"),
    ("x" * 20_000, "too_large"),
])
def test_malformed_messages_rejected_with_reason(raw: object, code: str) -> None:
    with pytest.raises(MalformedMessage) as info:
        parse_request(raw)
    assert info.value.code == code and info.value.reason


def test_rejection_never_echoes_values() -> None:
    with pytest.raises(MalformedMessage) as info:
        parse_request({**VALID, "reason": "sk_live_supersecret" * 10})
    assert "sk_live_supersecret" not in info.value.reason


def test_consume_rejects_and_records(world: World) -> None:
    assert consume("{oops", engine=world.engine, message_id="m1") == []
    assert consume({**VALID, "key": "nope"}, engine=world.engine, message_id="m2") == []
    with Session(world.engine) as session:
        events = session.exec(select(AuditEvent).where(AuditEvent.event == "queue_message_rejected")).all()
    assert [(e.detail["code"], e.detail["message_id"]) for e in events] == [("not_json", "m1"), ("refused", "m2")]


def test_same_idempotency_key_same_run_and_open_run_joined(world: World) -> None:
    (run1, created1), = consume(VALID, engine=world.engine)
    (run2, created2), = consume(VALID, engine=world.engine)
    (run3, created3), = consume({**VALID, "idempotency_key": "other"}, engine=world.engine)
    assert created1 and not created2 and not created3
    assert run1.id == run2.id == run3.id
    with Session(world.engine) as session:
        assert len(session.exec(select(RotationRun)).all()) == 1


EMERGENCY = {"version": 1, "provider": "acme", "all": True, "emergency": True, "reason": "breach",
             "requested_by": "secops:incident-7", "idempotency_key": "incident-7"}


def _add_key(world: World, name: str) -> None:
    from worker.db.models import ManagedKey
    from worker.db.session import session_scope

    with session_scope(world.engine) as session:
        session.add(ManagedKey(name=name, provider="acme", credential_type="api_key", owner="team@example.com",
                               vault_mount="secret", vault_path=f"apps/{name}", vault_field="api_key",
                               grace_period_s=0, integrations=[], labels={}))


def _step_messages(broker) -> int:  # type: ignore[no-untyped-def]
    return broker.queues["rotation"].qsize()


def test_redelivered_emergency_message_joins_the_same_runs(world: World) -> None:
    """A redelivered emergency (e.g. the worker died before acking) must not start a second
    emergency, not even once the first one's runs are over."""
    from dramatiq import get_broker

    from worker.db.session import session_scope
    from worker.pipeline.runs import load_run, transition
    from worker.protocol.states import RunState

    _add_key(world, "acme/billing")
    broker = get_broker()
    broker.flush_all()
    first = consume(EMERGENCY, engine=world.engine, message_id="m1")
    assert len(first) == 2 and all(created for _, created in first)
    assert all(run.emergency for run, _ in first)
    assert _step_messages(broker) == 2
    # The runs end (cancelled here, as if done), then the same message is delivered again.
    with session_scope(world.engine) as session:
        for run, _ in first:
            transition(session, load_run(session, run.id), RunState.cancelled, actor="tester")
    second = consume(EMERGENCY, engine=world.engine, message_id="m1")
    assert sorted(r.id for r, _ in second) == sorted(r.id for r, _ in first)
    assert not any(created for _, created in second)
    assert _step_messages(broker) == 2  # nothing enqueued again
    with Session(world.engine) as session:
        assert len(session.exec(select(RotationRun)).all()) == 2
    # A new emergency (another idempotency key) is a new batch of runs.
    third = consume({**EMERGENCY, "idempotency_key": "incident-8"}, engine=world.engine)
    assert len({r.id for r, _ in third} - {r.id for r, _ in first}) == 2
    assert all(created for _, created in third)


def test_emergency_message_joins_open_runs_without_reenqueueing(world: World) -> None:
    from dramatiq import get_broker

    broker = get_broker()
    broker.flush_all()
    (run, created), = consume(VALID, engine=world.engine)
    assert created and _step_messages(broker) == 1
    (joined, created2), = consume(EMERGENCY, engine=world.engine)
    assert joined.id == run.id and not created2
    assert _step_messages(broker) == 1


def test_emergency_joining_an_ordinary_run_in_grace_cuts_the_grace_short(world: World) -> None:
    """After a breach the old key must not stay valid for the rest of an ordinary run's grace."""
    from worker.clock import as_utc

    (run, _), = consume(VALID, engine=world.engine)
    assert world.drive(run.id, stop_at={RunState.verified}) == RunState.verified
    with Session(world.engine) as session:
        assert as_utc(session.get(RotationRun, run.id).grace_until) > world.clock.now
    (joined, created), = consume(EMERGENCY, engine=world.engine)
    assert joined.id == run.id and not created
    with Session(world.engine) as session:
        fresh = session.get(RotationRun, run.id)
        assert fresh.emergency and as_utc(fresh.grace_until) <= world.clock.now
        events = session.exec(select(AuditEvent).where(AuditEvent.event == "escalated_to_emergency")).all()
        assert [(e.actor, e.detail["grace_cut_short"]) for e in events] == [("secops:incident-7", True)]
    assert world.drive(run.id) == RunState.completed
    assert not world.provider.is_valid(world.old.secret)


def test_a_target_type_the_provider_does_not_declare_is_refused_with_the_reason(world: World) -> None:
    assert consume({**VALID, "target_credential_type": "nope"}, engine=world.engine, message_id="m3") == []
    with Session(world.engine) as session:
        [event] = session.exec(select(AuditEvent).where(AuditEvent.event == "queue_message_rejected")).all()
        assert session.exec(select(RotationRun)).all() == []
    assert event.detail["code"] == "refused" and "no credential type 'nope'" in event.detail["reason"]
