"""The shared rate limiter on real Redis: two limiter instances (two workers) share one budget,
and a 429 recorded by one makes the other back off."""

from __future__ import annotations

import time

import pytest

from worker.errors import RateLimited
from worker.providers.ratelimit import IN_FLIGHT_POLL_S, RateLimit, RedisRateLimiter
from keyrotor_sandbox.provider import start_provider_in_thread

pytestmark = pytest.mark.integration


def two_workers(redis_client, redis_namespace: str, max_wait: float = 0.0):  # type: ignore[no-untyped-def]
    a = RedisRateLimiter(redis_client, namespace=redis_namespace, max_wait=max_wait)
    b = RedisRateLimiter(redis_client, namespace=redis_namespace, max_wait=max_wait)
    for limiter in (a, b):
        limiter.register("alloy", RateLimit(5, 30.0))  # a 30 s window: no second boundary can reset it
    return a, b


def test_two_instances_share_one_budget(redis_client, redis_namespace: str) -> None:  # type: ignore[no-untyped-def]
    a, b = two_workers(redis_client, redis_namespace)
    for i in range(5):
        (a if i % 2 else b).acquire("alloy")
    with pytest.raises(RateLimited) as caught_a:
        a.acquire("alloy")
    with pytest.raises(RateLimited):
        b.acquire("alloy")
    assert caught_a.value.retry_after and caught_a.value.retry_after >= 1
    other = RedisRateLimiter(redis_client, namespace=redis_namespace, max_wait=0)
    other.register("asana", RateLimit(5, 30.0))
    other.acquire("asana")  # another provider has its own budget
    keys = [k.decode() for k in redis_client.scan_iter(match=f"{redis_namespace}:ratelimit:*")]
    assert keys and all(k.startswith(f"{redis_namespace}:ratelimit:") for k in keys)


def test_sub_second_limit_uses_buckets(redis_client, redis_namespace: str) -> None:  # type: ignore[no-untyped-def]
    limiter = RedisRateLimiter(redis_client, namespace=redis_namespace, max_wait=2.0)
    limiter.register("fast", RateLimit(2, 0.25))
    started = time.monotonic()
    for _ in range(6):  # 6 calls at 2 per 250 ms need at least two bucket changes
        limiter.acquire("fast")
    assert 0.2 <= time.monotonic() - started < 2.0


def test_429_recorded_by_one_worker_blocks_the_other(redis_client, redis_namespace: str) -> None:  # type: ignore[no-untyped-def]
    a, b = two_workers(redis_client, redis_namespace)
    a.block("alloy", 12.0)
    raw = redis_client.get(f"{redis_namespace}:ratelimit:alloy:blocked_until")
    assert raw is not None and float(raw) == pytest.approx(time.time() + 12.0, abs=1.0)
    assert 0 < redis_client.pttl(f"{redis_namespace}:ratelimit:alloy:blocked_until") <= 13_000
    with pytest.raises(RateLimited) as caught:
        b.acquire("alloy")
    assert caught.value.retry_after == pytest.approx(12.0, abs=1.0)
    b.block("alloy", 2.0)  # a shorter block never shortens the longer one
    assert b.blocked_for("alloy") == pytest.approx(12.0, abs=1.0)


def test_short_block_is_waited_out(redis_client, redis_namespace: str) -> None:  # type: ignore[no-untyped-def]
    a, b = two_workers(redis_client, redis_namespace, max_wait=2.0)
    a.block("alloy", 0.3)
    started = time.monotonic()
    b.acquire("alloy")
    assert 0.25 <= time.monotonic() - started < 1.5


def test_provider_429_through_http_blocks_a_second_worker(redis_client, redis_namespace: str) -> None:  # type: ignore[no-untyped-def]
    """End to end: worker A's provider gets a 429; worker B's provider makes no request at all."""
    from worker.inventory.schema import HttpProviderSpec
    from worker.providers.registry import build_provider
    from keyrotor_sandbox.provider import standin_provider_spec
    from worker.secret import Secret

    handle = start_provider_in_thread()
    try:
        spec = HttpProviderSpec.model_validate(standin_provider_spec(handle.url, admin_token_ref={"env": "ADMIN"}))
        workers = [
            build_provider(spec, name="alloy", resolve=lambda ref: Secret(handle.admin_token), attempts=1,
                           limiter=RedisRateLimiter(redis_client, namespace=redis_namespace, max_wait=0))
            for _ in range(2)
        ]
        handle.add_fault("list", status=429, retry_after=20)
        with pytest.raises(RateLimited):
            workers[0].list_keys()
        with pytest.raises(RateLimited) as caught:
            workers[1].list_keys()
        assert caught.value.retry_after == pytest.approx(20, abs=1)
        assert handle.stats()["routes"] == {"list": {"429": 1}}
    finally:
        handle.stop()


def test_a_slot_counts_until_released_across_workers(redis_client, redis_namespace: str) -> None:  # type: ignore[no-untyped-def]
    a, b = two_workers(redis_client, redis_namespace)
    for limiter in (a, b):
        limiter.register("alloy", RateLimit(2, 30.0))
    first = a.acquire("alloy", hold_s=120)
    b.acquire("alloy", hold_s=120)
    with pytest.raises(RateLimited) as caught:   # both in flight: their ends are unknown, look again soon
        b.acquire("alloy")
    assert caught.value.retry_after == pytest.approx(IN_FLIGHT_POLL_S, abs=0.01)
    a.release(first)                               # answered: it leaves the window 30 s from now
    with pytest.raises(RateLimited) as caught:
        b.acquire("alloy")
    assert caught.value.retry_after == pytest.approx(30.0, abs=1.0)
    key = f"{redis_namespace}:ratelimit:alloy:ends:2:30"
    seconds, micros = redis_client.time()
    ends = sorted(score for _member, score in redis_client.zrange(key, 0, -1, withscores=True))
    now_us = seconds * 1_000_000 + micros
    assert ends[0] <= now_us + 100_000 and now_us + 60_000_000 < ends[1]   # one ended, one still in flight
    a.release(first)                               # a second release never lengthens it
    assert sorted(score for _m, score in redis_client.zrange(key, 0, -1, withscores=True)) == ends


def test_buckets_are_taken_together_on_redis(redis_client, redis_namespace: str) -> None:  # type: ignore[no-untyped-def]
    a, _b = two_workers(redis_client, redis_namespace)
    a.register("alloy/search", RateLimit(1, 30.0))
    a.acquire("alloy", "alloy/search")
    with pytest.raises(RateLimited):
        a.acquire("alloy", "alloy/search")
    assert redis_client.zcard(f"{redis_namespace}:ratelimit:alloy:ends:5:30") == 1   # not spent by the refusal
    a.block("alloy", 5.0)
    with pytest.raises(RateLimited) as caught:
        a.acquire("alloy/search")
    assert caught.value.retry_after == pytest.approx(30.0, abs=1.0)   # the group's own window
    with pytest.raises(RateLimited) as caught:
        a.acquire("alloy", "alloy/search")
    assert caught.value.retry_after == pytest.approx(5.0, abs=1.0)    # the provider's 429 block comes first
