from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest

from worker.errors import PermanentError, RateLimited, TransientError
from worker.retry import RETRY_AFTER_CAP_S, backoff_delay, parse_retry_after, retry_call


class MaxRng:
    """Always picks the top of the jitter range, so tests see the ceiling."""

    def uniform(self, a: float, b: float) -> float:
        return b


class MinRng:
    def uniform(self, a: float, b: float) -> float:
        return a


class Flaky:
    def __init__(self, failures: list[BaseException], result: str = "ok") -> None:
        self.failures = list(failures)
        self.calls = 0
        self.result = result

    def __call__(self) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return self.result


# ------------------------------------------------------------------ backoff_delay
def test_backoff_ceiling_doubles_and_is_capped() -> None:
    assert [backoff_delay(n, 0.5, 3.0, rng=MaxRng()) for n in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_backoff_is_full_jitter_between_zero_and_ceiling() -> None:
    rng = random.Random(7)
    delays = [backoff_delay(3, 1.0, 100.0, rng=rng) for _ in range(500)]
    assert all(0.0 <= d <= 8.0 for d in delays)
    assert min(delays) < 1.0 and max(delays) > 7.0  # spread over the whole range, not fixed


def test_backoff_retry_after_is_a_floor_and_capped() -> None:
    assert backoff_delay(0, 1.0, 10.0, retry_after=4.0, rng=MinRng()) == 4.0
    assert backoff_delay(5, 1.0, 10.0, retry_after=0.1, rng=MaxRng()) == 10.0
    assert backoff_delay(0, 1.0, 10.0, retry_after=10_000.0, rng=MinRng()) == RETRY_AFTER_CAP_S


def test_backoff_huge_attempt_does_not_overflow() -> None:
    assert backoff_delay(10_000, 1.0, 5.0, rng=MaxRng()) == 5.0


def test_backoff_rejects_negative_attempt() -> None:
    with pytest.raises(ValueError):
        backoff_delay(-1, 1.0, 5.0)


# ------------------------------------------------------------------ parse_retry_after
NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("header", "expected"),
    [("120", 120.0), (" 3 ", 3.0), ("0", 0.0), ("1.5", 1.5), ("-4", 0.0), (None, None), ("", None),
     ("soon", None), ("nan", None), ("inf", None)],
)
def test_parse_retry_after_delta_seconds(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header, NOW) == expected


def test_parse_retry_after_http_date() -> None:
    header = format_datetime(NOW + timedelta(seconds=90), usegmt=True)  # "Wed, 01 May 2024 12:01:30 GMT"
    assert parse_retry_after(header, NOW) == 90.0


def test_parse_retry_after_past_date_is_zero() -> None:
    assert parse_retry_after("Wed, 01 May 2024 11:00:00 GMT", NOW) == 0.0


def test_parse_retry_after_uses_injected_clock_by_default() -> None:
    from worker.clock import set_clock

    set_clock(lambda: NOW)
    assert parse_retry_after("Wed, 01 May 2024 12:00:10 GMT") == 10.0


# ------------------------------------------------------------------ retry_call
def test_retry_call_succeeds_after_transient_failures() -> None:
    fn = Flaky([TransientError("a"), TransientError("b")])
    sleeps: list[float] = []
    assert retry_call(fn, attempts=3, base_delay=1.0, max_delay=10.0, sleep=sleeps.append, rng=MaxRng()) == "ok"
    assert fn.calls == 3
    assert sleeps == [1.0, 2.0]


def test_retry_call_reraises_last_error_when_exhausted() -> None:
    last = TransientError("third")
    fn = Flaky([TransientError("1"), TransientError("2"), last])
    sleeps: list[float] = []
    with pytest.raises(TransientError) as info:
        retry_call(fn, attempts=3, base_delay=0.1, max_delay=1.0, sleep=sleeps.append)
    assert info.value is last
    assert fn.calls == 3 and len(sleeps) == 2


def test_retry_call_does_not_retry_permanent_errors() -> None:
    fn = Flaky([PermanentError("no")])
    sleeps: list[float] = []
    with pytest.raises(PermanentError):
        retry_call(fn, attempts=5, base_delay=0.1, max_delay=1.0, sleep=sleeps.append)
    assert fn.calls == 1 and sleeps == []


def test_retry_call_honours_retry_after_as_minimum() -> None:
    fn = Flaky([RateLimited("slow down", retry_after=2.5)])
    sleeps: list[float] = []
    retry_call(fn, attempts=2, base_delay=0.1, max_delay=5.0, sleep=sleeps.append, rng=MinRng())
    assert sleeps == [2.5]


def test_retry_call_reraises_when_retry_after_exceeds_max_delay() -> None:
    fn = Flaky([RateLimited("come back in an hour", retry_after=3600.0)])
    sleeps: list[float] = []
    with pytest.raises(RateLimited):
        retry_call(fn, attempts=5, base_delay=0.1, max_delay=30.0, sleep=sleeps.append)
    assert fn.calls == 1 and sleeps == []  # no worker thread parked for an hour


def test_retry_call_custom_retry_on_and_on_retry_hook() -> None:
    fn = Flaky([ConnectionError("reset")])
    seen: list[tuple[int, str, float]] = []
    retry_call(fn, attempts=2, base_delay=1.0, max_delay=1.0, retry_on=(ConnectionError,),
               sleep=lambda s: None, on_retry=lambda n, e, d: seen.append((n, type(e).__name__, d)), rng=MaxRng())
    assert seen == [(1, "ConnectionError", 1.0)]


def test_retry_call_single_attempt_never_sleeps() -> None:
    fn = Flaky([TransientError("x")])
    with pytest.raises(TransientError):
        retry_call(fn, attempts=1, base_delay=1.0, max_delay=1.0, sleep=lambda s: pytest.fail("slept"))


def test_retry_call_rejects_zero_attempts() -> None:
    with pytest.raises(ValueError):
        retry_call(lambda: 1, attempts=0, base_delay=1.0, max_delay=1.0)
