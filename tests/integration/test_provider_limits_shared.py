"""Declared limits shared by every worker through Redis, against the Asana stand-in: two provider
instances (two workers) with their own limiter objects on one Redis namespace."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import pytest

from worker.errors import RateLimited
from worker.inventory.schema import HttpProviderSpec
from worker.providers.base import CheckOutcome
from worker.providers.http import HttpProvider
from worker.providers.ratelimit import RedisRateLimiter
from keyrotor_sandbox.asana import AsanaHandle, asana_provider_spec, start_asana_in_thread
from worker.secret import Secret

pytestmark = pytest.mark.integration


@pytest.fixture
def asana() -> Iterator[AsanaHandle]:
    handle = start_asana_in_thread(plan="free")
    yield handle
    handle.stop()


def workers(asana: AsanaHandle, redis_client: Any, namespace: str, n: int = 2, max_wait: float = 0.0,
            limiters: list[RedisRateLimiter] | None = None, **spec_changes: Any) -> list[HttpProvider]:
    """``n`` provider instances (workers), each with its own limiter object on one Redis namespace."""
    data = asana_provider_spec(asana.url)
    data.update(spec_changes)
    spec = HttpProviderSpec.model_validate(data)
    own = limiters if limiters is not None else [RedisRateLimiter(redis_client, namespace=namespace, max_wait=max_wait)
                                                 for _ in range(n)]
    return [HttpProvider("asana", spec, resolve=lambda ref: Secret("unused"), attempts=1, limiter=limiter)
            for limiter in own]


def check(provider: HttpProvider, token: str) -> str:
    try:
        return provider.check(Secret(token), credential_type="personal_access_token").value
    except RateLimited:
        return "held back"


def test_the_documented_limit_declared_no_429_ever(asana: AsanaHandle, redis_client: Any, redis_namespace: str) -> None:
    pat = asana.state.create_pat("alice", "keyrotor")
    a, b = workers(asana, redis_client, redis_namespace)
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda i: check((a, b)[i % 2], pat.token), range(200)))
    assert outcomes.count(CheckOutcome.valid.value) == 150 and outcomes.count("held back") == 50
    assert asana.state.answered(429) == 0 and asana.state.answered(200) == 150


def test_a_429_reaches_one_worker_once_then_everyone_waits(asana: AsanaHandle, redis_client: Any,
                                                             redis_namespace: str) -> None:
    pat = asana.state.create_pat("alice", "keyrotor")
    # Declared too generously: the stand-in's 150/min is what really applies.
    a, b = workers(asana, redis_client, redis_namespace, rate_limit={"requests": 1000, "per": "60s"})
    outcomes = [check(a, pat.token) for _ in range(151)]
    assert outcomes[:150] == ["valid"] * 150 and outcomes[150] == "held back"
    assert asana.state.answered(429) == 1
    with ThreadPoolExecutor(8) as pool:          # both workers, many threads: all wait out the Retry-After
        later = list(pool.map(lambda i: check((a, b)[i % 2], pat.token), range(40)))
    assert set(later) == {"held back"} and asana.state.answered(429) == 1


def test_concurrency_is_shared_by_every_worker(redis_client: Any, redis_namespace: str) -> None:
    asana = start_asana_in_thread(plan="paid", slow=0.3)
    try:
        pat = asana.state.create_pat("alice", "keyrotor")
        limiters = [RedisRateLimiter(redis_client, namespace=redis_namespace, max_wait=10.0) for _ in range(3)]
        providers = workers(asana, redis_client, redis_namespace, limiters=limiters, concurrency=2, endpoint_groups={})
        with ThreadPoolExecutor(9) as pool:
            outcomes = list(pool.map(lambda i: check(providers[i % 3], pat.token), range(18)))
        assert set(outcomes) == {"valid"}
        assert asana.state.peak["alice:read"] == 2
        assert [limiter.in_flight("asana") for limiter in limiters] == [0, 0, 0]   # every lease given back
    finally:
        asana.stop()
