"""Step retry policy: bounded, exponential with jitter, Retry-After floor, permanent not retried."""

from __future__ import annotations

import random

from worker.errors import PermanentError, RateLimited, StateConflict, TransientError
from worker.pipeline.context import StepPolicy
from worker.pipeline.retries import backoff_ms, decide

POLICY = StepPolicy(max_retries=5, min_backoff_ms=1000, max_backoff_ms=60_000, max_retry_after_s=600)


def test_backoff_grows_and_is_capped_with_jitter() -> None:
    rng = random.Random(1)
    for retries in range(12):
        ceiling = min(60_000, 1000 * 2 ** retries)
        samples = {backoff_ms(retries, POLICY, rng=rng) for _ in range(50)}
        assert all(ceiling / 2 <= d <= ceiling for d in samples)
        assert len(samples) > 10  # jittered


def test_retry_after_is_a_floor_and_capped() -> None:
    assert backoff_ms(0, POLICY, retry_after=30) >= 30_000
    assert backoff_ms(0, POLICY, retry_after=10 ** 9) <= 601_000


def test_decisions() -> None:
    assert decide(TransientError("503"), 0, POLICY).retry
    assert decide(RuntimeError("db hiccup"), 4, POLICY).retry
    assert not decide(TransientError("503"), 5, POLICY).retry  # bounded
    assert not decide(PermanentError("400"), 0, POLICY).retry
    assert not decide(StateConflict("moved"), 0, POLICY).retry
    assert decide(RateLimited("429", retry_after=7), 0, POLICY).delay_ms >= 7000


def test_configuration_errors_are_never_retried() -> None:
    from worker.errors import ConfigError
    from worker.inventory.loader import InventoryError

    policy = StepPolicy(max_retries=8)
    assert not decide(ConfigError("secret reference env:X: the variable is not set or empty"), 0, policy).retry
    assert not decide(InventoryError([]), 0, policy).retry


def test_a_missing_vault_reference_resolves_to_a_config_error() -> None:
    from worker.errors import ConfigError
    from worker.secret_refs import SecretRef, make_resolver
    from worker.vault.errors import VaultNotFound, VaultUnavailable

    class Store:
        def __init__(self, exc: Exception) -> None:
            self.exc = exc

        def read_field(self, mount: str, path: str, field: str) -> None:
            raise self.exc

    ref = SecretRef(vault="secret/app/x#token")
    try:
        make_resolver(Store(VaultNotFound("secret/data/app/x does not exist")))(ref)
    except ConfigError as exc:
        assert "vault:secret/app/x#token" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("expected a ConfigError")
    try:  # Vault down stays transient: the step retries it
        make_resolver(Store(VaultUnavailable("sealed")))(ref)
    except VaultUnavailable:
        pass
