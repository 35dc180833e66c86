"""Run leases (one execution of a step does its external effect at a time), the first step's
deadline, and messages for runs that cannot be read yet."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import update
from sqlmodel import Session

from tests.fakes_pipeline import FakeProvider, World
from worker.clock import as_utc
from worker.db.models import RotationRun
from worker.protocol.states import RunState
from worker.db.session import session_scope
from worker.pipeline import steps
from worker.pipeline.context import StepPolicy
from worker.protocol import Step


@pytest.fixture
def world(sqlite_url: str) -> World:
    return World(url=sqlite_url, provider=FakeProvider()).build()


def _run(world: World, run_id: str) -> RotationRun:
    with Session(world.engine) as session:
        run = session.get(RotationRun, run_id)
        assert run is not None
        return run


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_overlapping_executions_of_issue_mint_one_key(world: World) -> None:
    """A redelivery while the first execution is still inside the provider's issue call."""
    run_id = world.request()
    inside, finish = threading.Event(), threading.Event()
    real_issue = world.provider.issue

    def slow_issue(**kwargs: Any) -> Any:
        inside.set()
        assert finish.wait(10), "test hung"
        return real_issue(**kwargs)

    world.provider.issue = slow_issue  # type: ignore[method-assign]
    first: list[steps.Action] = []
    worker = threading.Thread(target=lambda: first.append(steps.execute(world.ctx, Step.issue, run_id)))
    worker.start()
    assert inside.wait(10)
    second = steps.execute(world.ctx, Step.issue, run_id)  # the duplicate, concurrently
    finish.set()
    worker.join(10)
    assert len(world.provider.issued_secrets) == 1, "the duplicate minted a second key"
    # The duplicate comes back when the lease would lapse, as a fresh message (no retry used up).
    assert second.step == Step.issue and not second.retry
    assert 0 < second.delay_ms <= world.ctx.policy.lease_ttl_s * 1000 + 500
    assert first and first[0].step == Step.precheck
    run = _run(world, run_id)
    assert run.state == RunState.issued and run.lease_owner is None and run.lease_until is None
    # When it comes back, the run has moved on: it is dropped and mints nothing.
    assert steps.execute(world.ctx, Step.issue, run_id) == steps.Action()
    assert len(world.provider.issued_secrets) == 1


def test_every_step_with_an_effect_claims_the_lease(world: World) -> None:
    """A lease held by another (live) execution stops each step before its effect."""
    run_id = world.request()
    for step, state in [(Step.issue, "requested"), (Step.precheck, "issued"), (Step.promote, "prechecked"),
                        (Step.propagate, "promoted"), (Step.verify, "propagated")]:
        with session_scope(world.engine) as session:
            session.execute(update(RotationRun).where(RotationRun.id == run_id)
                            .values(lease_owner="worker:other:abc", lease_until=world.clock.now + timedelta(seconds=5)))
        calls, vault_writes = list(world.provider.calls), dict(world.vault.paths)
        pushes = {n: list(i.events) for n, i in world.integrations.items()}
        action = steps.execute(world.ctx, step, run_id)
        assert action.step == step and not action.retry, step
        assert world.provider.calls == calls and world.vault.paths == vault_writes, f"{step} acted without the lease"
        assert {n: list(i.events) for n, i in world.integrations.items()} == pushes
        assert _run(world, run_id).state == RunState(state)
        assert _run(world, run_id).lease_owner == "worker:other:abc", "the holder's lease was released by another"
        # The holder crashed: its lease lapses, and the redelivered message proceeds.
        world.clock.advance(6)
        action = steps.execute(world.ctx, step, run_id)
        assert _run(world, run_id).state != RunState(state), step
        assert _run(world, run_id).lease_owner is None
        if step == Step.precheck:
            assert action.step == Step.promote


def test_a_step_that_waits_releases_its_lease(world: World) -> None:
    world.provider.activation_checks = 3  # precheck polls: the step returns "again in N s"
    run_id = world.request()
    steps.execute(world.ctx, Step.issue, run_id)
    action = steps.execute(world.ctx, Step.precheck, run_id)
    assert action.step == Step.precheck and action.delay_ms == 2000
    run = _run(world, run_id)
    assert run.state == RunState.issued and run.lease_owner is None and run.lease_until is None


def test_the_lease_is_renewed_while_the_step_runs(sqlite_url: str) -> None:
    world = World(url=sqlite_url, provider=FakeProvider()).build(policy=StepPolicy(lease_ttl_s=0.3, time_limit_ms=30_000))
    run_id = world.request()
    inside, finish = threading.Event(), threading.Event()
    real_issue = world.provider.issue

    def slow_issue(**kwargs: Any) -> Any:
        inside.set()
        assert finish.wait(10)
        return real_issue(**kwargs)

    world.provider.issue = slow_issue  # type: ignore[method-assign]
    worker = threading.Thread(target=lambda: steps.execute(world.ctx, Step.issue, run_id))
    worker.start()
    assert inside.wait(10)
    first_until = as_utc(_run(world, run_id).lease_until)
    world.clock.advance(1.0)  # longer than the ttl: without renewal the lease would have lapsed
    threading.Event().wait(0.5)  # real time for the renewer (ttl/3 = 0.1 s)
    renewed = _run(world, run_id)
    assert as_utc(renewed.lease_until) > first_until and as_utc(renewed.lease_until) > world.clock.now
    assert steps.execute(world.ctx, Step.issue, run_id).step == Step.issue  # still held
    finish.set()
    worker.join(10)
    assert len(world.provider.issued_secrets) == 1 and _run(world, run_id).state == RunState.issued


def test_a_new_run_has_a_step_deadline_so_a_lost_first_message_is_recovered(world: World) -> None:
    run_id = world.request()
    run = _run(world, run_id)
    assert as_utc(run.step_deadline_at) == world.clock.now + timedelta(seconds=2 * StepPolicy().time_limit_ms / 1000)
    from worker.service.reconcile import recover_stuck_runs
    from worker.service.hooks import Pipeline

    sent: list[str] = []
    pipeline = Pipeline(request_rotation=lambda *a, **k: None, enqueue_run=lambda r: sent.append(r.id))  # type: ignore[arg-type,return-value]
    assert recover_stuck_runs(world.engine, now=world.clock.now, pipeline=pipeline).requeued == []
    result = recover_stuck_runs(world.engine, now=world.clock.now + timedelta(seconds=241), pipeline=pipeline,
                                notify=lambda *a, **k: None)
    assert result.requeued == [run_id] and sent == [run_id]


def test_a_new_run_not_before_gets_its_deadline_after_it(world: World) -> None:
    start = world.clock.now + timedelta(hours=2)
    run_id = world.request(not_before=start)
    assert as_utc(_run(world, run_id).step_deadline_at) == start + timedelta(seconds=240)


def test_a_message_for_an_unreadable_run_is_retried_boundedly_then_dropped(world: World) -> None:
    policy = world.ctx.policy
    before_fail = _metric("keyrotor_step_failures_total", step="issue", error="RunMissing")
    before_dead = _metric("keyrotor_dead_letters_total", step="issue")
    delays = []
    for retries in range(policy.missing_run_retries):
        action = steps.execute(world.ctx, Step.issue, "not-committed-yet", retry_count=retries)
        assert action.retry and action.step == Step.issue
        delays.append(action.delay_ms)
    assert all(0 < d <= 10_000 for d in delays) and delays[-1] > delays[0]
    assert steps.execute(world.ctx, Step.issue, "not-committed-yet", retry_count=policy.missing_run_retries) == steps.Action()
    assert _metric("keyrotor_step_failures_total", step="issue", error="RunMissing") - before_fail == policy.missing_run_retries + 1
    assert _metric("keyrotor_dead_letters_total", step="issue") - before_dead == 1


def test_a_run_committed_after_its_message_arrived_is_processed_on_retry(world: World) -> None:
    """The inline driver stands in for Dramatiq: the retry of the first message finds the run."""
    from worker.pipeline.requests import new_run_id

    run_id = new_run_id()
    action = steps.execute(world.ctx, Step.issue, run_id)
    assert action.retry
    from worker.pipeline import requests

    real_new_run_id = requests.new_run_id
    requests.new_run_id = lambda: run_id  # type: ignore[assignment]
    try:
        assert world.request() == run_id
    finally:
        requests.new_run_id = real_new_run_id  # type: ignore[assignment]
    action = steps.execute(world.ctx, Step.issue, run_id, retry_count=1)
    assert action.step == Step.precheck and _run(world, run_id).state == RunState.issued
