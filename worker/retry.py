"""Short, bounded in-step retries: exponential backoff with full jitter, ``Retry-After`` aware.

Used around single external calls (Vault, provider, webhook). Step-level retries are Dramatiq's;
so when a server asks us to wait longer than ``max_delay`` we re-raise instead of parking a
worker thread, and the step reschedules itself.
"""

from __future__ import annotations

import random
import time
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Callable, Protocol, TypeVar

from worker.errors import TransientError
from worker.clock import utcnow

T = TypeVar("T")

# Never honour a Retry-After beyond this many seconds in-process, whatever max_delay says: a
# server asking for hours is a reason to reschedule, not to block.
RETRY_AFTER_CAP_S = 300.0


class _Uniform(Protocol):
    def uniform(self, a: float, b: float) -> float: ...


def backoff_ceiling(attempt: int, base: float, cap: float) -> float:
    """The exponential ceiling of retry number ``attempt`` (0-based): ``min(cap, base * 2**attempt)``.
    The one backoff curve: ``backoff_delay`` (full jitter) and the step retries (``equal_jitter``)
    draw their delays under it."""
    # Cap the exponent so 2**attempt cannot overflow for absurd attempt counts.
    return min(cap, base * (2 ** min(attempt, 62)))


def equal_jitter(ceiling: float, rng: _Uniform = random) -> float:
    """Half the ceiling plus a random half: retries that failed together spread out, and none
    comes back immediately."""
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


def backoff_delay(
    attempt: int,
    base: float,
    max_delay: float,
    retry_after: float | None = None,
    rng: _Uniform = random,
) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based): full jitter, floored by Retry-After.

    Full jitter (``uniform(0, min(max, base * 2**attempt))``) spreads retries of many workers
    that failed together. A server's ``retry_after`` is a floor: we never come back sooner.
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    delay = rng.uniform(0.0, max(0.0, backoff_ceiling(attempt, base, max_delay)))
    if retry_after is not None and retry_after > 0:
        delay = max(delay, min(retry_after, RETRY_AFTER_CAP_S))
    return delay


def parse_retry_after(header_value: str | None, now: datetime | None = None) -> float | None:
    """A ``Retry-After`` header as seconds from ``now``: delta-seconds or an HTTP-date.

    Returns ``None`` for a missing or unparsable value (the caller then uses plain backoff) and
    ``0.0`` for a date in the past.
    """
    if header_value is None:
        return None
    value = header_value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if seconds != seconds or seconds in (float("inf"), float("-inf")):  # NaN / inf
            return None
        return max(0.0, seconds)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        when = when.replace(tzinfo=timezone.utc)
    if now is None:
        now = utcnow()
    return max(0.0, (when - now).total_seconds())


def retry_call(
    fn: Callable[[], T],
    *,
    attempts: int,
    base_delay: float,
    max_delay: float,
    retry_on: tuple[type[BaseException], ...] = (TransientError,),
    sleep: Callable[[float], None] = time.sleep,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
    rng: _Uniform = random,
) -> T:
    """Call ``fn`` up to ``attempts`` times, sleeping with backoff between failures in ``retry_on``.

    The last error is re-raised unchanged once attempts are exhausted. An error whose
    ``retry_after`` exceeds ``max_delay`` is re-raised at once, so the caller (e.g. a Dramatiq
    step) can reschedule rather than block. ``on_retry(attempt, error, delay)`` is called before
    each sleep (for logging/metrics; it must not log secrets).
    """
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    attempt = 0
    while True:
        try:
            return fn()
        except retry_on as exc:
            retry_after = getattr(exc, "retry_after", None)
            if attempt + 1 >= attempts:
                raise
            if retry_after is not None and retry_after > max_delay:
                raise
            delay = backoff_delay(attempt, base_delay, max_delay, retry_after, rng)
            if on_retry is not None:
                on_retry(attempt + 1, exc, delay)
            sleep(delay)
            attempt += 1
