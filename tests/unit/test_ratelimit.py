"""The in-memory rate limiter (same contract as the Redis one): sliding window, bounded wait,
429 back-off shared by every caller."""

from __future__ import annotations

import pytest

from worker.errors import RateLimited
from worker.providers.ratelimit import InMemoryRateLimiter, RateLimit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def limiter(clock: Clock, max_wait: float) -> InMemoryRateLimiter:
    return InMemoryRateLimiter(max_wait=max_wait, now=clock.time, sleep=clock.sleep)


def test_window_allows_the_limit_then_waits_for_a_slot() -> None:
    clock = Clock()
    rl = limiter(clock, max_wait=10)
    rl.register("p", RateLimit(3, 2.0))
    for _ in range(3):
        rl.acquire("p")
    assert clock.slept == []
    rl.acquire("p")  # the fourth waits until the first call leaves the 2 s window
    assert clock.slept == [pytest.approx(2.0)]


def test_bounded_wait_raises_rate_limited_with_retry_after() -> None:
    clock = Clock()
    rl = limiter(clock, max_wait=0.5)
    rl.register("p", RateLimit(1, 60.0))
    rl.acquire("p")
    clock.now += 10
    with pytest.raises(RateLimited) as caught:
        rl.acquire("p")
    assert caught.value.retry_after == pytest.approx(50)
    assert clock.slept == []


def test_limits_are_per_provider() -> None:
    clock = Clock()
    rl = limiter(clock, max_wait=0)
    rl.register("a", RateLimit(1, 60.0))
    rl.register("b", RateLimit(1, 60.0))
    rl.acquire("a")
    rl.acquire("b")
    with pytest.raises(RateLimited):
        rl.acquire("a")


def test_block_after_429_stops_every_caller_until_it_passes() -> None:
    clock = Clock()
    rl = limiter(clock, max_wait=5)
    rl.block("p", 3.0)  # no registered limit: only the 429 back-off applies
    rl.acquire("p")
    assert clock.slept == [pytest.approx(3.0)]
    rl.block("p", 30.0)
    with pytest.raises(RateLimited) as caught:
        rl.acquire("p")
    assert caught.value.retry_after == pytest.approx(30.0)


def test_block_never_shortens_an_existing_block() -> None:
    clock = Clock()
    rl = limiter(clock, max_wait=0)
    rl.block("p", 20.0)
    rl.block("p", 1.0)
    assert rl.blocked_for("p") == pytest.approx(20.0)


def test_rate_limit_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        RateLimit(0, 1.0)
    with pytest.raises(ValueError):
        RateLimit(1, 0.0)
