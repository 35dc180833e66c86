"""Chaos at the provider: transient failures (429 with Retry-After, 5xx, garbage answers) are
retried — boundedly, with backoff, honouring Retry-After — and the run completes; a permanent 4xx
is not retried: the run fails, compensated, with the old key intact (invariant 8)."""

from __future__ import annotations

import pytest

from tests.chaos.test_crash_and_races import CLEAN_PATH
from tests.e2e.conftest import KEY_PATH, WorldFactory

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_transient_provider_failures_are_retried_boundedly_and_the_run_completes(make_world: WorldFactory) -> None:
    world = make_world(grace_s=1, probe_ms=30)
    monitor = world.monitor()
    provider, faults = world.provider, world.run_key_faults
    provider.add_fault("issue", garbage=True, count=1)               # issue attempt 1: HTML instead of JSON
    provider.add_fault("list", garbage=True, count=1)                # its settling look-up: garbage too
    provider.add_fault("issue", status=429, retry_after="2", count=1)  # issue attempt 2: rate limited
    faults.add_check_fault(status=503, count=2)                        # precheck: two 5xx, then fine
    provider.add_fault("revoke", status=500, count=1)                 # retire: one 5xx
    world.start_worker(threads=2)
    run_id = world.request()
    world.wait_state(run_id, ["completed"], timeout=40)
    monitor.stop()

    assert world.transitions(run_id) == CLEAN_PATH, world.trail(run_id)
    assert len(world.keys_of_run(run_id)) == 1
    # Every injected fault was met, and each call was repeated only as often as it failed.
    issue = [status for _, status in faults.calls("issue")]
    assert issue == [200, 429, 201], issue
    lists = [status for _, status in faults.calls("list")]
    assert lists == [200, 200], lists  # only after the garbage answer (outcome unknown): garbage, then the look
    revokes = [status for _, status in faults.calls("revoke")]
    assert revokes == [500, 204], revokes
    checks = [status for _, status in faults.calls("check")]
    assert checks[:3] == [503, 503, 200] and len(checks) <= 6, checks
    # Step-level retries are recorded, bounded, and the one after the 429 waited its Retry-After.
    retries = [e for e in world.audit(run_id) if e.event == "step_retry"]
    assert [e.detail["step"] for e in retries] == ["issue", "issue", "issue"], world.trail(run_id)
    assert retries[2].detail["retry_in_s"] >= 2.0
    unknown = [e for e in world.audit(run_id) if e.event == "issue_outcome_unknown"]
    assert len(unknown) == 1, world.trail(run_id)
    (_, _), (t_429, _), (t_201, _) = faults.calls("issue")
    assert t_201 - t_429 >= 2.0, f"re-issued {t_201 - t_429:.2f}s after a 429 with Retry-After: 2"
    assert not monitor.violations and world.consumer.stats()["probe_failures"] == 0


def test_a_permanent_4xx_is_not_retried_and_the_old_key_stays(make_world: WorldFactory) -> None:
    world = make_world(grace_s=1, probe_ms=30)
    world.provider.add_fault("issue", status=403, count=1)
    world.start_worker(threads=2)
    run_id = world.request()
    world.wait_state(run_id, ["failed"], timeout=30)

    assert world.transitions(run_id) == ["requested", "compensating", "failed"], world.trail(run_id)
    assert [status for _, status in world.run_key_faults.calls("issue")] == [403]
    assert not [e for e in world.audit(run_id) if e.event == "step_retry"], world.trail(run_id)
    assert "403" in (world.run(run_id).last_error or "")
    assert world.keys_of_run(run_id) == []
    assert world.current_secret() == world.seed_secret and world.provider.is_live(world.seed_secret)
    assert len(world.store.list_versions(world.mount, KEY_PATH)) == 1
    assert world.consumer.stats()["probe_failures"] == 0
    _, revoked = world.reconcile()
    assert revoked == [] and world.orphans_at_provider() == []


def test_a_permanent_4xx_after_issue_compensates_by_revoking_the_new_key(make_world: WorldFactory) -> None:
    world = make_world(grace_s=1, probe_ms=30)
    world.run_key_faults.add_check_fault(status=400, count=1)
    world.start_worker(threads=2)
    run_id = world.request()
    world.wait_state(run_id, ["failed"], timeout=30)

    assert world.transitions(run_id) == ["requested", "issued", "compensating", "failed"], world.trail(run_id)
    assert [status for _, status in world.run_key_faults.calls("check")] == [400]  # not retried
    minted = world.keys_of_run(run_id)
    assert len(minted) == 1 and minted[0].revoked
    assert world.run_key_faults.calls("revoke", "/" + world.seed_key_id) == []  # never the old key
    assert world.current_secret() == world.seed_secret and world.provider.is_live(world.seed_secret)
    assert world.consumer.stats()["probe_failures"] == 0
