"""Steps fused into one message hand the run to each other (worker/pipeline/handoff.py): the
transition of one claims the next step's lease in its own UPDATE and hands over the snapshot, so
only the chain's first step claims and reads one; a hand-off the chain does not use is released
when the chain ends. A chain also does not ask the provider again about a credential it accepted
a moment before (``effects.fresh_check``): retire does not check again the new key verify just
accepted."""

from __future__ import annotations

import re
from typing import Any, Iterator

import pytest
from sqlalchemy import event
from sqlmodel import Session, select

from tests.fakes_pipeline import FakeProvider, World
from worker.db.models import RotationRun
from worker.protocol.states import RunState

pytestmark = pytest.mark.integration

STEPS = ("issue", "precheck", "promote", "propagate", "verify", "retire", "finish")


@pytest.fixture
def world(pg_url: str) -> Iterator[World]:
    from worker.clock import set_clock
    from worker.pipeline.context import StepPolicy, configure
    from worker.runtime.broker import make_stub_broker, setup_broker

    setup_broker(broker=make_stub_broker())
    built = World(url=pg_url, provider=FakeProvider()).build(grace_period_s=0, policy=StepPolicy(activation_poll_s=0.01))
    set_clock(None)  # real time: the StubBroker's delays are real
    configure(built.ctx)
    yield built
    configure(None)


def _transactions(world: World) -> list[list[tuple[str, str]]]:
    """Every transaction the pipeline's engine runs: its statements as (step, statement). A
    transaction starts at a pool checkout (a session's or ``statement_scope``'s: each runs one) or
    at a BEGIN; a statement sent in autocommit begins nothing, its checkout marks it."""
    import structlog

    seen: list[list[tuple[str, str]]] = []

    def step() -> str:
        return str(structlog.contextvars.get_contextvars().get("step") or "-")

    event.listen(world.engine, "checkout", lambda *_: seen.append([]))
    event.listen(world.engine, "begin", lambda _conn: seen.append([]))
    event.listen(world.engine, "before_cursor_execute",
                 lambda _c, _cur, statement, *_: seen[-1].append((step(), re.sub(r"\s+", " ", statement))))
    return seen


def _committed_alone(world: World) -> list[tuple[str, bool, str]]:
    """(step, committed by itself, statement) of every statement: psycopg sent it without a BEGIN (the
    connection in autocommit), so no COMMIT follows either: the statement was the transaction."""
    import structlog
    from psycopg.pq import TransactionStatus

    seen: list[tuple[str, bool, str]] = []

    def after(_conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        step = str(structlog.contextvars.get_contextvars().get("step") or "-")
        seen.append((step, cursor.connection.info.transaction_status == TransactionStatus.IDLE,
                     re.sub(r"\s+", " ", statement)))

    event.listen(world.engine, "after_cursor_execute", after)
    return seen


def _rotate_through_actors(world: World) -> str:
    from worker.pipeline.outbox import enqueue_run
    from worker.queues import STEP_QUEUE
    from worker.runtime.workers import start_worker
    import dramatiq

    broker = dramatiq.get_broker()
    worker = start_worker(broker, threads=1)
    try:
        run_id = world.request()
        with Session(world.engine) as session:
            enqueue_run(session.get(RotationRun, run_id))
        broker.join(STEP_QUEUE, timeout=30_000)
    finally:
        worker.stop()
    return run_id


def _state(world: World, run_id: str) -> tuple[RunState, Any]:
    with Session(world.engine) as session:
        run = session.get(RotationRun, run_id)
        assert run is not None
        return RunState(run.state), run.lease_owner


def test_only_the_first_step_of_a_chain_reads_a_snapshot(world: World) -> None:
    assert world.drive(world.request()) == RunState.completed  # the key's first rotation adopts its version
    transactions = _transactions(world)
    alone = _committed_alone(world)
    run_id = _rotate_through_actors(world)
    assert _state(world, run_id) == (RunState.completed, None)

    statements = [(s, text) for tx in transactions for s, text in tx]
    claims = [s for s, text in statements if "UPDATE rotation_run SET lease_owner" in text]
    assert claims == ["issue"], claims
    # ... with its snapshot, in one statement sent without BEGIN and COMMIT: the claim's UPDATE
    # (RETURNING the run) joined with the key, its provider record and the versions.
    snapshot_reads = [(s, by_itself) for s, by_itself, text in alone if s in STEPS and "FROM claimed JOIN managed_key " in text]
    assert snapshot_reads == [("issue", True)], snapshot_reads
    assert [s for s, text in statements if s in STEPS and text.startswith("SELECT managed_key.")] == []
    # Each transition but the last claims the next step in its own UPDATE and returns the run.
    transitions = [(s, text) for s, text in statements if "UPDATE rotation_run SET state" in text]
    moves = [(s, "RETURNING rotation_run.id, rotation_run.key_id, rotation_run.state," in text)
             for s, text in transitions]
    assert moves == [(step, step != "finish") for step in STEPS], moves
    # ... and writes its audit row in the same statement: one round trip per transition.
    assert all(text.startswith("WITH moved AS") and "INSERT INTO audit_event" in text for _, text in transitions)
    # propagate (handed over by promote: no sink was pushed for the run yet) and verify read no
    # sink row and write theirs in their transition's transaction.
    assert [s for s, text in statements if text.startswith("SELECT sink_delivery")] == []
    per_step = [tx[0][0] for tx in transactions if tx]
    assert per_step.count("propagate") == 1 and per_step.count("verify") == 1, per_step
    # The steps after issue are one statement each, their rows in it (the versions' stages, the
    # sinks' rows, the key's rotation and next due date), sent without BEGIN and COMMIT.
    after_issue = STEPS[1:]
    assert [tx for tx in transactions if tx and tx[0][0] in after_issue and len(tx) != 1] == []
    assert [s for s, by_itself, _ in alone if s in after_issue and not by_itself] == []
    writes = {s: text for s, text in transitions}
    assert "UPDATE key_version SET stage" in writes["promote"] and "UPDATE key_version SET stage" in writes["retire"]
    assert "INSERT INTO sink_delivery" in writes["propagate"] and "UPDATE sink_delivery" in writes["verify"]
    assert "UPDATE managed_key SET" in writes["finish"] and "next_due_at" in writes["finish"]
    # In issue, the issue call's answer and the end of its unknown outcome are one statement, sent
    # alone; its other transactions have several statements each.
    minted = [text for s, by_itself, text in alone if s == "issue" and by_itself and "claimed" not in text]
    assert len(minted) == 1 and "INSERT INTO audit_event" in minted[0], minted
    assert "UPDATE rotation_run SET issue_unknown_since" in minted[0], minted
    # issue: the claim with its snapshot; its reads with the mark before the issue call; the
    # minted key's record before staging; the transition.
    issue = [[text for _, text in tx] for tx in transactions if tx and tx[0][0] == "issue"]
    assert len(issue) == 4, issue
    assert issue[1][-1].startswith("UPDATE rotation_run SET issue_unknown_since"), issue[1]


def test_a_hand_off_the_chain_does_not_use_is_released(world: World) -> None:
    from worker.pipeline.handoff import chain_handoffs, chain_owner
    from worker.pipeline.steps import execute
    from worker.protocol import Step

    run_id = world.request()
    with chain_handoffs(world.engine, "worker:test"):
        action = execute(world.ctx, Step.issue, run_id)
        assert action.step == Step.precheck and action.delay_ms == 0
        # The issue step's transition claimed precheck for this chain...
        assert _state(world, run_id) == (RunState.issued, chain_owner())
    # ... and the chain ended without running it: nobody holds the run.
    assert _state(world, run_id) == (RunState.issued, None)
    assert world.drive(run_id) == RunState.completed


def _checks_of_new_key(world: World, run_id: str) -> int:
    from worker.db.models import KeyVersion

    with Session(world.engine) as session:
        run = session.get(RotationRun, run_id)
        assert run is not None and run.new_version_id is not None
        new = session.get(KeyVersion, run.new_version_id)
        assert new is not None
    return sum(1 for call, key_id in world.provider.calls if call == "check" and key_id == new.provider_key_id)


def test_retire_right_after_verify_in_a_chain_uses_its_answer_about_the_new_key(world: World) -> None:
    """precheck and verify ask (verify's is the check after promotion, whose failure rolls back);
    retire, running right after verify in the same chain, uses its answer (and says so in the
    audit trail) instead of asking the same question again."""
    from worker.db.models import AuditEvent

    assert world.drive(world.request()) == RunState.completed
    run_id = _rotate_through_actors(world)
    assert _state(world, run_id) == (RunState.completed, None)
    assert _checks_of_new_key(world, run_id) == 2
    with Session(world.engine) as session:
        events = session.exec(select(AuditEvent).where(AuditEvent.run_id == run_id, AuditEvent.event == "state_changed"))
        details = {e.to_state: e.detail for e in events}
    assert details["retired"]["new_check"].startswith("valid at verify")
    assert details["retired"]["old_check"] == "invalid"  # the old key's revocation is still confirmed


def test_steps_that_do_not_follow_each_other_at_once_ask_the_provider_each_time(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each step in its own message (the inline driver): nothing to reuse.
    run_id = world.request()
    assert world.drive(run_id) == RunState.completed
    assert _checks_of_new_key(world, run_id) == 3
    # In a chain, an answer older than the freshness bound is not reused.
    from worker.pipeline import effects

    monkeypatch.setattr(effects, "FRESH_CHECK_S", 0.0)
    run_id = _rotate_through_actors(world)
    assert _state(world, run_id) == (RunState.completed, None)
    assert _checks_of_new_key(world, run_id) == 3


def test_propagate_and_verify_find_the_integration_records_issue_read(world: World) -> None:
    """The integration factory looks each integration's record up (a changed record rebuilds
    it); in a chain it finds the records issue read (all of them in one statement), and asks the
    database nothing."""
    import dataclasses

    from worker.db.models import IntegrationRecord, ManagedKey

    with Session(world.engine) as session:
        names = list(session.exec(select(ManagedKey)).one().integrations or [])
        for name in names:
            session.add(IntegrationRecord(name=name, kind="webhook", spec={"url": "https://sink.example/hook"}))
        session.commit()
    assert names
    fake_factory = world.ctx.integration_factory

    def factory(session: Session, name: str) -> Any:
        assert session.get(IntegrationRecord, name) is not None  # as the registry's factory does
        return fake_factory(session, name)

    from worker.pipeline.context import configure

    configure(dataclasses.replace(world.ctx, integration_factory=factory))
    transactions = _transactions(world)
    run_id = _rotate_through_actors(world)
    assert _state(world, run_id) == (RunState.completed, None)
    reads = [s for tx in transactions for s, text in tx if text.startswith("SELECT integration.")]
    assert len(names) > 1 and reads == ["issue"], reads


def test_a_chain_asks_the_provider_factory_once(world: World) -> None:
    """issue builds the provider from the record it read; precheck, verify and retire, handed that
    snapshot, use the same adapter. Steps in their own messages each read a snapshot and ask."""
    import dataclasses

    from worker.pipeline.context import configure

    fake_factory = world.ctx.provider_factory
    asked: list[str] = []

    def factory(session: Session, key: Any) -> Any:
        import structlog

        asked.append(str(structlog.contextvars.get_contextvars().get("step")))
        return fake_factory(session, key)

    configure(dataclasses.replace(world.ctx, provider_factory=factory))
    world.ctx = dataclasses.replace(world.ctx, provider_factory=factory)
    run_id = _rotate_through_actors(world)
    assert _state(world, run_id) == (RunState.completed, None)
    assert asked == ["issue"]
    asked.clear()
    assert world.drive(world.request()) == RunState.completed
    assert asked == ["issue", "precheck", "verify", "retire"]
