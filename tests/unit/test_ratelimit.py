"""The in-memory rate limiter (same contract as the Redis one): sliding window, bounded wait,
429 back-off shared by every caller."""

from __future__ import annotations

import pytest

from worker.errors import RateLimited
from worker.providers.ratelimit import IN_FLIGHT_POLL_S, WINDOW_MARGIN_S, InMemoryRateLimiter, RateLimit, window_margin


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


def test_a_slot_counts_until_its_request_ends_not_from_when_it_was_taken() -> None:
    clock = Clock()
    rl = limiter(clock, max_wait=0)
    rl.register("p", RateLimit(2, 1.0))
    first = rl.acquire("p", hold_s=30)
    rl.acquire("p", hold_s=30)
    clock.now += 5   # both still in flight: their arrival at the provider may still lie ahead
    with pytest.raises(RateLimited) as caught:
        rl.acquire("p")
    assert caught.value.retry_after == pytest.approx(IN_FLIGHT_POLL_S)
    rl.release(first)     # answered now: it may have arrived just now, so it counts one more period
    with pytest.raises(RateLimited) as caught:
        rl.acquire("p")
    assert caught.value.retry_after == pytest.approx(1.0)
    clock.now += 1.0
    rl.acquire("p")


def test_a_slot_whose_end_is_never_reported_counts_until_its_hold_runs_out() -> None:
    clock = Clock()
    rl = limiter(clock, max_wait=0)
    rl.register("p", RateLimit(1, 1.0))
    rl.acquire("p", hold_s=10)   # the worker died mid-request
    clock.now += 10.5
    with pytest.raises(RateLimited):
        rl.acquire("p")
    clock.now += 0.5
    rl.acquire("p")


def test_release_never_lengthens_a_slot_and_slot_releases_on_errors() -> None:
    clock = Clock()
    rl = limiter(clock, max_wait=10)
    rl.register("p", RateLimit(1, 1.0))
    ticket = rl.acquire("p")          # no hold: ends at once (a caller that reports nothing)
    clock.now += 0.5
    rl.release(ticket)
    rl.acquire("p")
    assert clock.slept == [pytest.approx(0.5)]
    with pytest.raises(ZeroDivisionError):
        with rl.slot("q", hold_s=30):
            1 / 0
    rl.register("q", RateLimit(1, 1.0))
    with rl.slot("q", hold_s=30):
        clock.now += 0.2
    rl.acquire("q")                    # released when the block ended: one period after that
    assert clock.slept[-1] == pytest.approx(1.0)


def test_buckets_are_taken_all_at_once_or_not_at_all() -> None:
    clock = Clock()
    rl = limiter(clock, max_wait=0)
    rl.register("p", RateLimit(2, 60.0))
    rl.register("p/search", RateLimit(1, 60.0))
    rl.acquire("p", "p/search")
    with pytest.raises(RateLimited):
        rl.acquire("p", "p/search")   # the group is full: the provider's slot is not spent
    rl.acquire("p")


def test_a_block_on_any_bucket_is_honoured() -> None:
    clock = Clock()
    rl = limiter(clock, max_wait=0)
    rl.block("p", 2.0)
    with pytest.raises(RateLimited) as caught:
        rl.acquire("p", "p/search")
    assert caught.value.retry_after == pytest.approx(2.0)


def test_the_window_margin_covers_clock_rates_not_latency() -> None:
    assert window_margin(1.0) == pytest.approx(0.002)
    assert window_margin(60.0) == pytest.approx(0.061)
    assert window_margin(3600.0) == WINDOW_MARGIN_S
