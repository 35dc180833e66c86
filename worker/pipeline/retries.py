"""Step-level retry policy: how an error is classified and how long to wait before the next try.

Dramatiq runs the retries (``dramatiq.Retry(delay=…)`` re-enqueues the message and counts it in
``message.options["retries"]``); this module decides *whether* and *when*:

- ``PermanentError`` and ``ConfigError`` (e.g. a secret reference that does not resolve) → no
  retry: the run takes its failure path now (a configuration error does not heal by waiting).
- ``TransientError`` (timeouts, 5xx, 429, garbage) and unexpected exceptions (a database hiccup,
  a Dramatiq time limit) → retry with exponential backoff and jitter, never sooner than the
  error's ``retry_after`` (the server's Retry-After), until ``max_retries`` is used up.
- ``StateConflict`` → not an error: another worker moved the run; drop the message.

When the budget is spent the run goes to ``failure_target(..., exhausted)`` (needs_attention, or a
rollback first after promotion). Messages that still die (e.g. the database is down while we try
to record the failure) reach the ``dead_letter`` actor via Dramatiq's ``on_retry_exhausted``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

from worker.errors import StateConflict, TransientError
from worker.errors import is_permanent as _is_permanent
from worker.pipeline.context import StepPolicy
from worker.retry import backoff_ceiling, equal_jitter


@dataclass(frozen=True)
class RetryDecision:
    retry: bool
    delay_ms: int = 0


def is_permanent(exc: BaseException) -> bool:
    return _is_permanent(exc)


def is_conflict(exc: BaseException) -> bool:
    return isinstance(exc, StateConflict)


def retry_after_s(exc: BaseException) -> Optional[float]:
    value = getattr(exc, "retry_after", None) if isinstance(exc, TransientError) else None
    try:
        return float(value) if value is not None and float(value) >= 0 else None
    except (TypeError, ValueError):
        return None


def backoff_ms(retries: int, policy: StepPolicy, retry_after: Optional[float] = None,
               rng: random.Random | None = None) -> int:
    """Delay before retry number ``retries`` (0-based): exponential, jittered, Retry-After floor.

    "Equal jitter": half the exponential ceiling plus a random half, so workers that failed
    together spread out but none retries immediately.
    """
    uniform = (rng or random).uniform
    delay = equal_jitter(backoff_ceiling(retries, policy.min_backoff_ms, policy.max_backoff_ms), rng or random)
    if retry_after is not None:
        floor_ms = min(retry_after, policy.max_retry_after_s) * 1000
        delay = max(delay, floor_ms + uniform(0, min(1000.0, floor_ms * 0.1 + 1)))
    return int(delay)


def decide(exc: BaseException, retries: int, policy: StepPolicy, rng: random.Random | None = None) -> RetryDecision:
    """Retry this failure? ``retries`` is how many retries the message already had."""
    if is_permanent(exc) or is_conflict(exc):
        return RetryDecision(retry=False)
    if retries >= policy.max_retries:
        return RetryDecision(retry=False)
    return RetryDecision(retry=True, delay_ms=backoff_ms(retries, policy, retry_after_s(exc), rng))


def error_label(exc: BaseException) -> str:
    """A metric label for an error: its class name (never its text)."""
    return type(exc).__name__
