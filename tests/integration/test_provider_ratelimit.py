"""The shared rate limiter on real Redis: two limiter instances (two workers) share one budget,
and a 429 recorded by one makes the other back off."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from worker.errors import RateLimited
from worker.providers.ratelimit import IN_FLIGHT_POLL_S, RateLimit, RedisRateLimiter, flush_all_releases
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


class CountingRedis(redis.Redis):
    """The real client, counting its script calls; ``fail_next`` makes the next one fail before it is sent."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.script_calls = 0
        self.fail_next = False

    def evalsha(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        if self.fail_next:
            self.fail_next = False
            raise redis.ConnectionError("injected: Redis went away")
        answer = super().evalsha(*args, **kwargs)
        self.script_calls += 1  # counted once answered: a first call's NOSCRIPT is retried by redis-py
        return answer


def _ends(redis_client: Any, key: str) -> tuple[int, list[float]]:
    seconds, micros = redis_client.time()
    return seconds * 1_000_000 + micros, sorted(score for _m, score in redis_client.zrange(key, 0, -1, withscores=True))


def deferring(redis_client: Any, redis_namespace: str, delay_s: float) -> tuple[RedisRateLimiter, CountingRedis]:
    client = CountingRedis(connection_pool=redis_client.connection_pool)
    limiter = RedisRateLimiter(client, namespace=redis_namespace, max_wait=0, release_delay_s=delay_s)
    limiter.register("alloy", RateLimit(2, 30.0))
    return limiter, client


def test_a_deferred_release_rides_along_with_the_next_acquire(redis_client, redis_namespace: str) -> None:  # type: ignore[no-untyped-def]
    """One script call per request instead of two: the release waits for the process's next acquire."""
    # 10 delays fit the 30 s window; the flusher stays out of it
    limiter, client = deferring(redis_client, redis_namespace, delay_s=3.0)
    key = f"{redis_namespace}:ratelimit:alloy:ends:2:30"
    first = limiter.acquire("alloy", hold_s=120)
    limiter.release(first)
    now_us, ends = _ends(redis_client, key)
    assert client.script_calls == 1 and ends[0] > now_us + 60_000_000   # not sent: Redis still counts it in flight
    limiter.acquire("alloy", hold_s=120)
    now_us, ends = _ends(redis_client, key)
    assert client.script_calls == 2                                      # the release went with this acquire
    assert ends[0] <= now_us and ends[1] > now_us + 60_000_000           # the first ended when it was released


def test_a_release_nobody_carries_is_sent_after_the_delay(redis_client, redis_namespace: str) -> None:  # type: ignore[no-untyped-def]
    limiter, client = deferring(redis_client, redis_namespace, delay_s=0.05)
    key = f"{redis_namespace}:ratelimit:alloy:ends:2:30"
    limiter.release(limiter.acquire("alloy", hold_s=120))
    deadline = time.monotonic() + 5
    now_us, ends = _ends(redis_client, key)
    while ends[0] > now_us and time.monotonic() < deadline:   # still in flight as far as Redis knows
        time.sleep(0.01)
        now_us, ends = _ends(redis_client, key)
    assert ends[0] <= now_us and client.script_calls == 2   # the acquire, then the flusher's release


def test_a_deferred_release_admits_nobody_sooner(redis_client, redis_namespace: str) -> None:  # type: ignore[no-untyped-def]
    """Until the release is sent, another worker finding the window full is told to look again soon
    (the entry is in flight); once sent, it waits for the window, as with a release sent at once."""
    a, _client = deferring(redis_client, redis_namespace, delay_s=3.0)
    b = RedisRateLimiter(redis_client, namespace=redis_namespace, max_wait=0)
    b.register("alloy", RateLimit(2, 30.0))
    first = a.acquire("alloy", hold_s=120)
    b.acquire("alloy", hold_s=120)
    a.release(first)
    with pytest.raises(RateLimited) as caught:
        b.acquire("alloy")
    assert caught.value.retry_after == pytest.approx(IN_FLIGHT_POLL_S, abs=0.01)
    flush_all_releases()   # what a stopping worker does (worker/runtime/broker.py FlushRateReleases)
    with pytest.raises(RateLimited) as caught:
        b.acquire("alloy")
    assert caught.value.retry_after == pytest.approx(30.0, abs=1.0)


def test_a_release_in_a_short_window_is_sent_at_once(redis_client, redis_namespace: str) -> None:  # type: ignore[no-untyped-def]
    """A window shorter than RELEASE_DELAY_PERIODS delays would count a deferred slot too long."""
    limiter, client = deferring(redis_client, redis_namespace, delay_s=0.05)
    limiter.register("fast", RateLimit(2, 0.2))
    limiter.release(limiter.acquire("fast", hold_s=120))
    now_us, ends = _ends(redis_client, f"{redis_namespace}:ratelimit:fast:ends:2:0.2")
    assert client.script_calls == 2 and ends[0] <= now_us


def test_releases_carried_by_a_failed_acquire_are_sent_later(redis_client, redis_namespace: str) -> None:  # type: ignore[no-untyped-def]
    limiter, client = deferring(redis_client, redis_namespace, delay_s=3.0)
    key = f"{redis_namespace}:ratelimit:alloy:ends:2:30"
    limiter.release(limiter.acquire("alloy", hold_s=120))
    client.fail_next = True
    with pytest.raises(redis.ConnectionError):
        limiter.acquire("alloy", hold_s=120)
    limiter.flush_releases()
    now_us, ends = _ends(redis_client, key)
    assert ends == [pytest.approx(ends[0])] and ends[0] <= now_us   # the one slot, ended


def test_near_the_limit_releases_go_at_once(redis_client, redis_namespace: str) -> None:  # type: ignore[no-untyped-def]
    """A full window's waiters wait for the oldest end they can see: once the process's last acquire
    found a window at least half full, a release is not deferred (an emergency spends its budget)."""
    limiter, client = deferring(redis_client, redis_namespace, delay_s=3.0)
    key = f"{redis_namespace}:ratelimit:alloy:ends:2:30"
    first = limiter.acquire("alloy", hold_s=120)   # the window was empty
    limiter.acquire("alloy", hold_s=120)           # half full when asked: crowded
    limiter.release(first)
    now_us, ends = _ends(redis_client, key)
    assert client.script_calls == 3 and ends[0] <= now_us   # sent by itself, at once
