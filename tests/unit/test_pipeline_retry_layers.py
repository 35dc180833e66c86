"""One retry layer per call (invariant 8): Vault store calls are retried inside the store, provider
calls inside the HTTP provider (never ``issue``), and a step as a whole by Dramatiq. The pipeline
must not wrap a store call in retries of its own (4 × 4 = 16 attempts against a sick Vault)."""

from __future__ import annotations

import socket

import hvac
import pytest

from tests.fakes_pipeline import FakeProvider, World
from worker.db.models import RotationRun
from worker.protocol.states import RunState
from worker.db.session import session_scope
from worker.pipeline import steps
from worker.pipeline.runs import load_run
from worker.protocol import Step
from worker.vault.auth import TokenAuth
from worker.vault.errors import VaultUnavailable
from worker.vault.store import VaultStore


@pytest.fixture
def world(sqlite_url: str) -> World:
    return World(url=sqlite_url, provider=FakeProvider()).build()


def _state(world: World, run_id: str) -> RotationRun:
    with session_scope(world.engine) as session:
        run = load_run(session, run_id)
        assert run is not None
        session.expunge(run)
        return run


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class StagingOnDeadVault:
    """The fake Vault, except that staging goes through a real VaultStore whose Vault is down."""

    def __init__(self, fake: object, store: VaultStore) -> None:
        self._fake, self.store = fake, store

    def __getattr__(self, name: str) -> object:
        return getattr(self._fake, name)

    def stage_pending(self, *args: object) -> None:
        self.store.stage_pending(*args)  # type: ignore[arg-type]


def test_staging_uses_only_the_stores_retries(world: World) -> None:
    addr = f"http://127.0.0.1:{_closed_port()}"
    sleeps: list[float] = []
    store = VaultStore(hvac.Client(url=addr, timeout=1), TokenAuth("t"), addr=addr, retry_attempts=4,
                       retry_base_delay=0.01, retry_max_delay=0.05, sleep=sleeps.append)
    world.ctx.vault = StagingOnDeadVault(world.vault, store)
    run_id = world.request()
    action = steps.execute(world.ctx, Step.issue, run_id)
    assert store.requests == 4, "stage_pending was retried on top of the store's own retries"
    assert len(sleeps) == 3 and all(0 <= s <= 0.05 for s in sleeps)  # bounded, backed off
    # The step itself is retried later by Dramatiq (bounded by the policy, with backoff) ...
    assert action.retry and action.step == Step.issue and action.delay_ms >= 500
    run = _state(world, run_id)
    assert run.state == RunState.requested and run.attempts == 1 and "VaultUnavailable" in run.last_error
    # ... and the key that could not be staged was revoked at once (no orphan, invariant 4).
    first_key = world.provider.calls[0][1]
    assert world.provider.revoked_ids() == [first_key]


def test_staging_failure_is_one_call_then_a_step_retry_with_a_fresh_key(world: World) -> None:
    calls: list[str] = []
    original = world.vault.stage_pending

    def counting(run_id: str, secret: object, key_id: object, expires_at: object = None) -> None:
        calls.append(run_id)
        original(run_id, secret, key_id, expires_at)  # type: ignore[arg-type]

    world.vault.stage_pending = counting  # type: ignore[method-assign]
    world.vault.faults.add("stage_pending", VaultUnavailable("503: Vault is sealed"))
    run_id = world.request()
    action = steps.execute(world.ctx, Step.issue, run_id)
    assert len(calls) == 1 and action.retry
    assert world.drive(run_id) == RunState.completed
    assert len(calls) == 2 and len(world.provider.issued_secrets) == 2
    first, second = world.provider.issued_secrets
    assert not world.provider.is_valid(first) and world.vault_value() == second
