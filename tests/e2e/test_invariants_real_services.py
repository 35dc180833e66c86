"""The invariants, proven with real processes: keyrotor workers as subprocesses on real Redis and
PostgreSQL, a real OpenBao server, a provider stand-in and a consumer stand-in over real HTTP.

Every check is made from the outside: what the provider stand-in minted and revoked, what Vault
serves, what the consumer holds and whether its probes failed, the audit trail in the database,
and — for invariant 5 — every byte the service wrote to its logs, to Redis and to the database.
"""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from tests.e2e.conftest import KEY_NAME, World, WorldFactory
from worker.secret import fingerprint

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _states(world: World, run_id: str) -> list[str]:
    return world.transitions(run_id)


def _event(world: World, run_id: str, to_state: str):  # type: ignore[no-untyped-def]
    matches = [e for e in world.audit(run_id) if e.event == "state_changed" and e.to_state == to_state]
    assert len(matches) == 1, f"expected one transition to {to_state}\n{world.trail(run_id)}"
    return matches[0]


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def test_rotation_completes_without_outage_and_retires_after_verification_and_grace(make_world: WorldFactory) -> None:
    world = make_world(grace_s=2, activation_delay=0.6, probe_ms=30)
    monitor = world.monitor()
    monitor.watch(world.seed_secret)
    world.start_worker(threads=2)
    run_id = world.request()
    world.wait_state(run_id, ["completed"], timeout=40)
    monitor.stop()

    # The protocol's path, in order, each step once (invariant 6).
    assert _states(world, run_id) == ["requested", "issued", "prechecked", "promoted", "propagated",
                                      "verified", "retired", "completed"], world.trail(run_id)
    assert all(e.actor for e in world.audit(run_id))

    # Exactly one key was minted for the run, named after it (invariants 4 and 7).
    minted = world.keys_of_run(run_id)
    assert len(minted) == 1, world.trail(run_id)
    new = minted[0]
    new_fp = fingerprint(new.secret)

    # The new key is in Vault and at every integration.
    assert world.current_secret() == new.secret
    assert world.copy_secret() == new.secret
    assert world.consumer.fingerprint == new_fp
    health = world.consumer.consumer  # the consumer's own view, as its /health reports it
    assert health.key_works()[0]
    sinks = world.sinks(run_id)
    assert set(sinks) == {"app-consumer", "app-copy"}
    assert all(s.status == "verified" and s.fingerprint == new_fp for s in sinks.values()), sinks

    # The old key is revoked, and only after verification passed and the grace period ended
    # (invariant 2): by the audit trail and by what the provider itself saw.
    assert world.provider.key(world.seed_key_id).revoked
    assert not world.provider.is_live(world.seed_secret)
    verified = _event(world, run_id, "verified")
    retired = _event(world, run_id, "retired")
    grace_until = datetime.fromisoformat(verified.detail["grace_until"])
    assert verified.detail["sinks"] == {"app-consumer": "ok", "app-copy": "ok"}
    assert _aware(retired.at) >= _aware(grace_until) >= _aware(verified.at)
    revoked_seen = monitor.watched[world.seed_secret]
    assert revoked_seen is not None, "the monitor never saw the old key stop working"
    assert revoked_seen >= _aware(grace_until), (revoked_seen, grace_until)

    # No outage (invariant 1): every sample of "Vault's key works at the provider" held, and the
    # consumer, probing the provider with the key it loaded from Vault, never failed.
    assert monitor.samples > 20 and not monitor.violations, monitor.violations[:5]
    stats = world.consumer.stats()
    assert stats["probes"] > 20 and stats["probe_failures"] == 0, stats
    assert world.provider.failures("check") >= 1  # the new key was polled before it went live
    # Run bookkeeping: the key rotated, its next due time computed.
    run = world.run(run_id)
    assert run.finished_at is not None and run.last_error is None
    assert not world.orphans_at_provider()


def test_failure_before_promotion_revokes_the_new_key_and_keeps_the_old(make_world: WorldFactory) -> None:
    world = make_world(grace_s=1, probe_ms=30)
    # The first health call with the new key gets a permanent 4xx: the precheck fails. (The
    # consumer keeps probing with the old key, untouched by the fault.)
    world.run_key_faults.add_check_fault(status=400, count=1)
    world.start_worker()
    run_id = world.request()
    world.wait_state(run_id, ["failed"], timeout=30)

    assert _states(world, run_id) == ["requested", "issued", "compensating", "failed"], world.trail(run_id)
    minted = world.keys_of_run(run_id)
    assert len(minted) == 1 and minted[0].revoked, "the new key must be revoked by compensation"
    assert world.current_secret() == world.seed_secret
    assert world.provider.is_live(world.seed_secret)
    assert world.copy_secret() is None  # never propagated
    assert world.consumer.fingerprint == fingerprint(world.seed_secret)
    assert world.consumer.stats()["probe_failures"] == 0
    failed_versions = world.versions(run_id)
    assert [str(getattr(v.stage, "value", v.stage)) for v in failed_versions] == ["failed"]
    assert "400" in (world.run(run_id).last_error or "")
    assert not world.orphans_at_provider()


def test_failure_after_promotion_rolls_vault_and_integrations_back(make_world: WorldFactory) -> None:
    world = make_world(grace_s=1, probe_ms=30)
    # Health calls with the new key: precheck passes, then verify's provider check is refused —
    # the new key "stopped working" after promotion.
    world.run_key_faults.add_check_fault(skip=1, status=401, count=5)
    world.start_worker()
    run_id = world.request()
    world.wait_state(run_id, ["rolled_back"], timeout=30)

    assert _states(world, run_id) == ["requested", "issued", "prechecked", "promoted", "propagated",
                                      "rolling_back", "rolled_back"], world.trail(run_id)
    minted = world.keys_of_run(run_id)
    assert len(minted) == 1 and minted[0].revoked, "rollback revokes the new key"
    # Vault serves the old secret again, as its newest version; the old key still works.
    assert world.current_secret() == world.seed_secret
    versions = world.store.list_versions(world.mount, "apps/e2e/alloy")
    assert len(versions) == 3, versions  # seed, new, old-restored
    assert world.provider.is_live(world.seed_secret) and not world.provider.key(world.seed_key_id).revoked
    # Integrations were re-pushed the old key.
    assert world.copy_secret() == world.seed_secret
    assert world.consumer.fingerprint == fingerprint(world.seed_secret)
    assert world.consumer.stats()["events"] == ["rotated", "rolled_back"]
    sinks = world.sinks(run_id)
    assert all(s.status == "restored" and s.fingerprint == fingerprint(world.seed_secret) for s in sinks.values()), sinks
    assert world.consumer.stats()["probe_failures"] == 0, world.consumer.stats()
    assert not world.orphans_at_provider()


def test_no_issued_secret_appears_in_logs_redis_or_database(make_world: WorldFactory) -> None:
    world = make_world(grace_s=1, activation_delay=0.3, probe_ms=50)
    world.start_worker(threads=2, log_level="DEBUG")
    sampler = world.redis_sampler()
    completed = world.request()
    world.wait_state(completed, ["completed"], timeout=40)
    # A second rotation that fails after promotion, so rollback and its error paths log too.
    world.provider.configure(activation_delay=0)
    world.run_key_faults.add_check_fault(skip=1, status=401, count=5)
    rolled = world.request()
    world.wait_state(rolled, ["rolled_back"], timeout=40)

    issued = world.issued_secrets()
    assert len(issued) == 3  # seed + one per run
    # Credentials the workers were given must not leak either.
    watched = [*issued, world.provider.admin_token, world.webhook_secret, world.vault_token]
    sampler.stop()
    sampled = sampler.blobs()
    # The sampler did see the queue's messages (step messages, delayed ones) and the shared rate limiter.
    assert any(".msgs" in name for name in sampled), sorted(sampled)
    assert any("step_" in blob.decode(errors="replace") for blob in sampled.values())
    assert any(":ratelimit:" in name for name in sampled), sorted(sampled)
    db_blobs = world.db_dump()
    assert db_blobs["table audit_event"] and db_blobs["table key_version"]
    # The scan can find a secret where there is one (it is not vacuous).
    assert world.leaks([issued[-1]], extra={"probe": b"x" + issued[-1].encode()}) == [
        f"{fingerprint(issued[-1])} in probe"]
    assert world.leaks(watched, extra=sampled) == []
    logs = world.worker_logs()
    assert "run.transition" in logs or "state_changed" in logs or "transition" in logs, logs[:2000]
    for secret in issued:
        assert fingerprint(secret) in db_blobs["table key_version"].decode() or secret == world.seed_secret
