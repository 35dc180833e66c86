"""Declared limits shared by every worker through Redis, against the Asana stand-in: two provider
instances (two workers) with their own limiter objects on one Redis namespace."""

from __future__ import annotations

import bisect
import multiprocessing
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import pytest

from worker.errors import RateLimited
from worker.inventory.schema import HttpProviderSpec
from worker.providers.base import CheckOutcome
from worker.providers.http import HttpProvider
from worker.providers.ratelimit import RedisRateLimiter, shared_limiter
from keyrotor_sandbox.asana import AsanaHandle, asana_provider_spec, start_asana_in_thread
from keyrotor_sandbox.provider import ProviderApp, ProviderState, standin_provider_spec
from keyrotor_sandbox.standin_http import serve_in_thread
from worker.secret import Secret

pytestmark = pytest.mark.integration

ADMIN_TOKEN = "sbx-admin-limits-test"


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


# ---------------------------------------------------------------------------- the whole budget, no 429
class _LateCountingState(ProviderState):
    """A provider that counts a request some milliseconds after it was sent (a load balancer, a
    busy server): the jitter between keyrotor taking a slot and the provider counting it. Every
    counted arrival is kept, to check every window afterwards."""

    arrivals: list[float]

    def take_rate_slot(self) -> float | None:
        time.sleep(random.uniform(0.0, 0.08))
        wait = super().take_rate_slot()
        if wait is None:
            with self.lock:
                self.arrivals.append(self.clock())
        return wait


def _slow_vault(ref: Any) -> Secret:
    time.sleep(random.uniform(0.0, 0.02))  # a Vault read of the admin token, before the slot
    return Secret(ADMIN_TOKEN)


def _client_process(url: str, redis_url: str, namespace: str, threads: int, calls: int, limit: int) -> None:
    """One worker process: its own limiter and provider, ``threads`` threads issuing, checking and
    revoking keys at full speed."""
    spec = HttpProviderSpec.model_validate(standin_provider_spec(
        url, admin_token_ref={"vault": "kv/admin#token"}, rate_limit={"requests": limit, "per": "1s"}))
    limiter = shared_limiter(redis_url, namespace=namespace, max_wait=60.0)  # as deployed: releases deferred
    provider = HttpProvider("standin", spec, resolve=_slow_vault, limiter=limiter, attempts=1)

    def work(n: int) -> None:
        for i in range(calls // 3):
            issued = provider.issue(name=f"k-{os.getpid()}-{n}-{i}", credential_type="api_key", labels={})
            provider.check(issued.secret, credential_type="api_key")
            provider.revoke(key_id=issued.key_id, secret=None, credential_type="api_key")

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, range(threads)))


def test_many_processes_at_the_limit_never_see_a_429(redis_url: str, redis_namespace: str) -> None:
    """3 processes × 4 threads against a 20/s sliding window whose server counts each request up
    to 30 ms late: every request is answered, and no window of 1 s ever held more than 20."""
    limit = 20
    state = _LateCountingState(admin_token=ADMIN_TOKEN, rate_limit=(limit, 1.0))
    state.arrivals = []
    server = serve_in_thread(ProviderApp(state))
    try:
        ctx = multiprocessing.get_context("spawn")
        children = [ctx.Process(target=_client_process, args=(server.url, redis_url, redis_namespace, 4, 15, limit))
                    for _ in range(3)]
        for child in children:
            child.start()
        for child in children:
            child.join(180)
    finally:
        server.stop()
    assert state.failures() == 0, state.snapshot_stats()   # no 429 (nor anything else but 2xx)
    assert [child.exitcode for child in children] == [0, 0, 0]
    arrivals = sorted(state.arrivals)
    assert len(arrivals) == 3 * 4 * 15
    busiest = max(bisect.bisect_right(arrivals, t + 1.0 - 1e-9) - i for i, t in enumerate(arrivals))
    assert busiest <= limit
