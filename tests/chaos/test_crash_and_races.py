"""Chaos: workers killed with SIGKILL mid-step, duplicate delivery, two workers racing one run.

Each ends in the same state as a clean run (invariant 7), with at most one key minted per run and
no orphan once the reconciler has run (invariant 4), without the consumer ever failing (invariant
1). A SIGKILLed worker's unacknowledged message is only redelivered by Dramatiq after its
heartbeat times out (a minute or more); the reconciler is what recovers the run, run here with its
clock ahead so the step deadline has passed.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.e2e.conftest import World, WorldFactory

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLEAN_PATH = ["requested", "issued", "prechecked", "promoted", "propagated", "verified", "retired", "completed"]
STEPS = ["issue", "precheck", "promote", "propagate", "verify", "retire", "finish", "compensate", "rollback"]


def _wait(predicate, what: str, world: World, run_id: str, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}\n{world.trail(run_id)}\n{world.worker_logs()[-3000:]}", pytrace=False)


def _assert_clean_completion(world: World, run_id: str, monitor) -> None:  # type: ignore[no-untyped-def]
    assert world.transitions(run_id) == CLEAN_PATH, world.trail(run_id)
    minted = world.keys_of_run(run_id)
    assert len(minted) == 1, f"{len(minted)} keys minted for one run\n{world.trail(run_id)}"
    assert world.current_secret() == minted[0].secret and not minted[0].revoked
    assert world.copy_secret() == minted[0].secret
    assert world.provider.key(world.seed_key_id).revoked
    # The old key was revoked once (a concurrent duplicate may meet 404: already gone); the new never.
    revokes = [s for _, s in world.run_key_faults.calls("revoke", "/" + world.seed_key_id)]
    assert revokes.count(204) == 1 and set(revokes) <= {204, 404}, revokes
    assert world.run_key_faults.calls("revoke", "/" + minted[0].id) == []
    monitor.stop()
    assert not monitor.violations, monitor.violations[:5]
    stats = world.consumer.stats()
    assert stats["probe_failures"] == 0, stats
    _, revoked = world.reconcile()
    assert revoked == [] and world.orphans_at_provider() == []


def test_sigkill_mid_precheck_then_a_new_worker_completes_the_run(make_world: WorldFactory) -> None:
    world = make_world(grace_s=1, probe_ms=30)
    monitor = world.monitor()
    # The provider is slow to answer the first health call with the new key: the worker is
    # inside the precheck's HTTP call when it is killed.
    world.run_key_faults.add_check_fault(delay=3.0, count=1)
    first = world.start_worker(threads=2)
    run_id = world.request()
    _wait(lambda: world.run_key_faults.hits == 1, "the precheck to be in flight", world, run_id)
    time.sleep(0.2)
    first.kill(signal.SIGKILL)
    assert world.state(run_id) == "issued"

    world.start_worker(threads=2)
    stuck, _ = world.reconcile()
    assert run_id in stuck.requeued, world.trail(run_id)
    world.wait_state(run_id, ["completed"], timeout=30)
    assert any(e.event == "requeued" and e.actor == "reconciler" for e in world.audit(run_id))
    _assert_clean_completion(world, run_id, monitor)


def test_sigkill_mid_chain_the_redelivered_message_resumes_the_run_without_the_reconciler(make_world: WorldFactory) -> None:
    """Issue and precheck run in one message (worker/runtime/chains.py). Killed inside the
    precheck, the worker leaves the *issue* message unacknowledged; redelivered once its heartbeat
    lapses, it finds the run past issue and, being marked as a chain, goes on from there: no
    reconciler, no step deadline to wait for."""
    world = make_world(grace_s=1, probe_ms=30)
    monitor = world.monitor()
    world.run_key_faults.add_check_fault(delay=3.0, count=1)
    first = world.start_worker(threads=2)
    run_id = world.request()
    _wait(lambda: world.run_key_faults.hits == 1, "the precheck to be in flight", world, run_id)
    time.sleep(0.2)
    first.kill(signal.SIGKILL)
    assert world.state(run_id) == "issued"

    world.start_worker(threads=2)
    world.wait_state(run_id, ["completed"], timeout=60)
    assert not any(e.actor == "reconciler" for e in world.audit(run_id)), world.trail(run_id)
    assert "chain.resumed" in world.worker_logs(), world.worker_logs()[-3000:]
    _assert_clean_completion(world, run_id, monitor)


def test_sigkill_while_the_provider_mints_revokes_the_lost_key_before_issuing_again(make_world: WorldFactory) -> None:
    """Killed inside the issue call: the provider minted a key whose secret nobody received. The
    redelivered step waits until that call cannot be in flight any more, finds the lost key by the
    run's name, revokes it, and only then issues the key the run goes on with."""
    world = make_world(grace_s=1, probe_ms=30)
    monitor = world.monitor()
    world.provider.add_fault("issue", delay=1.5, count=1)
    first = world.start_worker(threads=2)
    run_id = world.request()
    _wait(lambda: not world.provider.state.faults, "the issue call to be in flight", world, run_id)
    time.sleep(0.1)
    first.kill(signal.SIGKILL)
    # The provider finishes the request the dead worker made: the key exists, its secret is lost.
    _wait(lambda: len(world.keys_of_run(run_id)) == 1, "the provider to mint the key", world, run_id)
    lost = world.keys_of_run(run_id)[0]
    assert world.state(run_id) == "requested"

    world.start_worker(threads=2)
    # What Dramatiq does once the dead worker's heartbeat times out: redeliver its unacked message.
    world.enqueue(run_id)
    world.wait_state(run_id, ["completed"], timeout=40)
    assert world.transitions(run_id) == CLEAN_PATH, world.trail(run_id)
    minted = world.keys_of_run(run_id)
    assert len(minted) == 2 and world.provider.key(lost.id).revoked, world.trail(run_id)
    fresh = next(k for k in minted if k.id != lost.id)
    assert world.current_secret() == fresh.secret and not fresh.revoked
    strays = [e.detail for e in world.audit(run_id) if e.event == "stray_key_found"]
    assert [(d["provider_key_id"], d["revocation"]) for d in strays] == [(lost.id, "revoked")], world.trail(run_id)
    monitor.stop()
    assert not monitor.violations, monitor.violations[:5]
    _, revoked = world.reconcile()
    assert revoked == [] and world.orphans_at_provider() == []


def test_reconciler_recovers_a_requested_run_whose_message_was_lost(make_world: WorldFactory) -> None:
    world = make_world(grace_s=1, probe_ms=None)
    world.start_worker(threads=2)
    run_id = world.request(enqueue=False)  # the message is lost
    stuck, _ = world.reconcile()
    assert run_id in stuck.requeued, world.trail(run_id)
    world.wait_state(run_id, ["completed"], timeout=30)


def _storm(world: World, run_id: str, *, until_s: float, every_s: float = 0.1) -> int:
    """Send every step's message for the run, over and over (duplicates and out-of-order ones)."""
    sent = 0
    deadline = time.monotonic() + until_s
    while time.monotonic() < deadline and world.state(run_id) not in ("completed", "failed", "rolled_back"):
        for step in STEPS:
            world.send_step(step, run_id)
            sent += 1
        time.sleep(every_s)
    return sent


def test_duplicate_delivery_of_every_step_ends_like_a_clean_run(make_world: WorldFactory) -> None:
    """One worker thread: duplicates (and out-of-order messages of every step) arrive one after
    the other; each is dropped or finds the work already done."""
    world = make_world(grace_s=1, activation_delay=0.5, probe_ms=30)
    monitor = world.monitor()
    world.start_worker(threads=1)
    run_id = world.request(enqueue=False)
    world.enqueue(run_id)
    world.enqueue(run_id)  # the same step message twice
    sent = _storm(world, run_id, until_s=25)
    world.wait_state(run_id, ["completed"], timeout=30)
    assert sent > 20
    _assert_clean_completion(world, run_id, monitor)


def test_two_workers_racing_every_step_after_issue_end_in_one_outcome(make_world: WorldFactory) -> None:
    """Two worker processes (two threads each) receive duplicates of every step at once from the
    precheck on: concurrent executions race on the conditional UPDATE and one outcome wins."""
    world = make_world(grace_s=2, activation_delay=0.8, probe_ms=30)
    monitor = world.monitor()
    world.start_worker(threads=2)
    world.start_worker(threads=2)
    run_id = world.request()
    world.wait_state(run_id, ["issued", "prechecked", "promoted", "propagated", "verified"], timeout=20)
    sent = _storm(world, run_id, until_s=25, every_s=0.05)
    world.wait_state(run_id, ["completed"], timeout=30)
    assert sent > 50
    _assert_clean_completion(world, run_id, monitor)


def test_two_workers_racing_the_issue_step_mint_one_key(make_world: WorldFactory) -> None:
    world = make_world(grace_s=1, probe_ms=30)
    monitor = world.monitor()
    # A slow provider: the look-up before minting answers late, so both executions of the issue
    # step have looked (and found no key for the run) before either mints.
    world.run_key_faults.add_slow_answer("list", delay=0.6, count=2)
    world.start_worker(threads=2)
    world.start_worker(threads=2)
    run_id = world.request(enqueue=False)
    world.enqueue(run_id)
    world.enqueue(run_id)
    world.wait_state(run_id, ["completed"], timeout=30)
    _assert_clean_completion(world, run_id, monitor)
