"""A Redis failover in the middle of rotations, on a real Sentinel deployment.

The world of tests/e2e/conftest.py (keyrotor workers as subprocesses, real OpenBao and PostgreSQL,
provider and consumer stand-ins over HTTP) with ``KEYROTOR_REDIS_URL`` naming a Sentinel-managed
Redis (tests/sentinel_cluster.py: master, replica, three sentinels). Rotations run one after the
other; while one is in flight the master is SIGKILLed, the sentinels promote the replica, and the
workers, the producer and the limiter carry on against the new master. Whatever the failover lost
(Redis replicates asynchronously) is recovered from the database by the reconciler. Every run must
end completed, Vault must never serve a key the provider rejects, and no key may be left behind.
"""

from __future__ import annotations

import time
from typing import Callable

import pytest

from tests.e2e.conftest import TERMINAL, World, WorldFactory
from tests.sentinel_cluster import SentinelCluster, sentinel_cluster  # noqa: F401  (fixture)

# Two worker subprocesses, a Sentinel deployment and six rotations: minutes on a loaded machine.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

ROTATIONS = 6
KILL_DURING = 2          # the rotation (0-based) during which the master dies
STALL_S = 20.0           # no state change this long: the run waits for the reconciler


@pytest.fixture
def redis_url(sentinel_cluster: SentinelCluster) -> str:  # noqa: F811  (overrides the plain Redis)
    return sentinel_cluster.url


def _retrying(action: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    """A producer retries a send that met the failover (the next attempt reaches the new master)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            action()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} kept failing for {timeout}s after the failover") from None
            time.sleep(0.5)


def _settle(world: World, run_id: str, timeout: float = 90.0) -> str:
    """Wait until the run is terminal or makes no progress for STALL_S; its state then."""
    deadline = time.monotonic() + timeout
    last, since = world.state(run_id), time.monotonic()
    while time.monotonic() < deadline:
        state = world.state(run_id)
        if state in TERMINAL:
            return state
        if state != last:
            last, since = state, time.monotonic()
        elif time.monotonic() - since > STALL_S:
            return state
        time.sleep(0.1)
    return world.state(run_id)


def _unreplicated_bytes(cluster: SentinelCluster) -> int:
    """How far the replica's copy lags behind the master right now (bytes of the replication
    stream); what a kill at this moment loses at most."""
    with cluster.node(cluster.master_port()) as master:
        info = master.info("replication")
    replica = next((v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)), None)
    return max(0, int(info["master_repl_offset"]) - int(replica["offset"])) if replica else -1


def test_master_killed_mid_rotation_every_run_completes(make_world: WorldFactory,
                                                        sentinel_cluster: SentinelCluster) -> None:  # noqa: F811
    cluster = sentinel_cluster
    world = make_world(grace_s=1, activation_delay=0.3, probe_ms=50)
    monitor = world.monitor()
    world.start_worker(threads=2)
    world.start_worker(threads=2)

    runs: list[str] = []
    recovered: list[str] = []   # "run id@state it waited in"
    failover_s = -1.0
    unreplicated = -1
    for index in range(ROTATIONS):
        run_box: list[str] = []
        _retrying(lambda: run_box.append(world.request(reason=f"sentinel-{index}")), "requesting a rotation")
        run_id = run_box[-1]
        runs.append(run_id)
        if index == KILL_DURING:
            # Mid-run: the new key is issued, the next steps are still to come.
            deadline = time.monotonic() + 30
            while world.state(run_id) == "requested" and time.monotonic() < deadline:
                time.sleep(0.02)
            assert world.state(run_id) not in TERMINAL, world.trail(run_id)
            unreplicated = _unreplicated_bytes(cluster)
            killed_at = time.monotonic()
            old = cluster.kill_master()
            new = cluster.wait_for_failover(old)
            failover_s = time.monotonic() - killed_at
            assert new != old
        state = _settle(world, run_id)
        if state not in TERMINAL:
            # Its message (or the next step's) was lost with the old master, or is held by a
            # consumer that will not see it again: the database knows where the run stands.
            stuck = None

            def reconcile() -> None:
                nonlocal stuck
                stuck, _ = world.reconcile()

            _retrying(reconcile, "the reconciler")
            assert stuck is not None and run_id in stuck.requeued, world.trail(run_id)
            recovered.append(f"{run_id[:8]}@{state}")
            state = _settle(world, run_id)
        assert state == "completed", world.trail(run_id) + "\n" + world.worker_logs()[-3000:]
    monitor.stop()

    # Vault never served a key the provider rejects; the consumer never failed a probe.
    assert not monitor.violations, monitor.violations[:5]
    assert monitor.samples > 0
    # Each run minted one key (a retried issue may have revoked a stray first) and the key Vault
    # serves is the last run's; once the reconciler has swept, no live key is left behind.
    for run_id in runs:
        live = [k for k in world.keys_of_run(run_id) if not k.revoked]
        assert len(live) <= 1, world.trail(run_id)
    last_keys = [k for k in world.keys_of_run(runs[-1]) if not k.revoked]
    assert len(last_keys) == 1 and world.current_secret() == last_keys[0].secret
    _retrying(world.reconcile, "the orphan sweep")
    assert world.orphans_at_provider() == []
    assert world.leaks(world.issued_secrets()) == []

    stats = world.consumer.stats()
    logs = world.worker_logs()
    print(f"\nsentinel failover: rotations={len(runs)} completed={len(runs)} "
          f"failover_s={failover_s:.1f} (SIGKILL to a promoted master that accepts writes) "
          f"recovered_by_reconciler={len(recovered)} {recovered} "
          f"consumer_reconnects={logs.count('Consumer encountered a connection error')} "
          f"acks_retried={logs.count('Failed to post_process_message')} "
          f"unreplicated_bytes_at_kill={unreplicated} "
          f"consumer_probe_failures={stats['probe_failures']} vault_samples={monitor.samples}")
    assert stats["probe_failures"] == 0, stats
    assert failover_s > 0
