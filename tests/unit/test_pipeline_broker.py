"""The actors on a StubBroker with an in-process Dramatiq worker: end to end, retries, bad input."""

from __future__ import annotations

import time

import pytest
from sqlmodel import Session

from tests.fakes_pipeline import FakeProvider, World
from worker.db.models import RotationRun
from worker.protocol.states import RunState
from worker.errors import TransientError
from worker.runtime.broker import make_stub_broker, setup_broker
from worker.queues import REQUEST_QUEUE, STEP_QUEUE
from worker.pipeline.context import StepPolicy, configure
from worker.queues import send_request
from worker.pipeline.outbox import enqueue_run
from worker.runtime.workers import start_worker


@pytest.fixture
def stub(sqlite_url: str):  # type: ignore[no-untyped-def]
    broker = setup_broker(broker=make_stub_broker())
    world = World(url=sqlite_url, provider=FakeProvider()).build(
        grace_period_s=0, policy=StepPolicy(max_retries=3, min_backoff_ms=5, max_backoff_ms=20, time_limit_ms=10_000,
                                            activation_poll_s=0.01, activation_timeout_s=5))
    from worker.clock import set_clock
    set_clock(None)  # real time: the StubBroker's delays are real
    configure(world.ctx)
    worker = start_worker(broker, threads=2)
    yield world, broker
    worker.stop()
    configure(None)


def wait_for(world: World, run_id: str, states: set[RunState], timeout: float = 10) -> RunState:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with Session(world.engine) as session:
            state = RunState(session.get(RotationRun, run_id).state)
        if state in states:
            return state
        time.sleep(0.02)
    raise AssertionError(f"run {run_id} stuck in {state}")


def test_rotation_through_actors(stub) -> None:  # type: ignore[no-untyped-def]
    world, broker = stub
    started = time.monotonic()
    run_id = world.request()
    with Session(world.engine) as session:
        enqueue_run(session.get(RotationRun, run_id))
    assert wait_for(world, run_id, {RunState.completed, RunState.failed}) == RunState.completed
    print(f"end-to-end in-process rotation: {(time.monotonic() - started) * 1000:.0f} ms")
    assert world.vault_value() == world.provider.issued_secrets[0]


def test_transient_errors_retried_by_dramatiq_then_needs_attention(stub) -> None:  # type: ignore[no-untyped-def]
    world, broker = stub
    world.provider.faults.always("issue", TransientError("503"))
    run_id = world.request()
    with Session(world.engine) as session:
        enqueue_run(session.get(RotationRun, run_id))
    assert wait_for(world, run_id, {RunState.needs_attention, RunState.completed}) == RunState.needs_attention


def test_queue_message_and_garbage_do_not_stop_the_worker(stub) -> None:  # type: ignore[no-untyped-def]
    world, broker = stub
    broker.actors["rotation_requests"].send("{garbage")
    broker.actors["rotation_requests"].send(1, 2, 3)
    send_request({"version": 1, "key": world.key.name, "reason": "manual", "requested_by": "queue-test",
                  "idempotency_key": "q-1"})
    broker.join(REQUEST_QUEUE, timeout=10_000)
    with Session(world.engine) as session:
        from sqlmodel import select
        run = session.exec(select(RotationRun).where(RotationRun.idempotency_key == "q-1")).one()
    assert wait_for(world, run.id, {RunState.completed}) == RunState.completed
    broker.join(STEP_QUEUE, timeout=10_000)
    assert broker.dead_letters == []
