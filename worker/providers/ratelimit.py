"""A provider's rate limit, shared by every worker.

``RedisRateLimiter`` counts calls in Redis with Dramatiq's ``WindowRateLimiter`` (a sliding
window over per-second buckets; ``BucketRateLimiter`` for sub-second or very long periods), so N
workers together stay under ``rate_limit {requests, per}``. When a provider still answers 429,
``block(provider, retry_after)`` records ``<namespace>:ratelimit:<provider>:blocked_until`` and
every worker's ``acquire`` waits it out. ``acquire`` waits at most ``max_wait`` seconds, then
raises ``RateLimited(retry_after=…)`` so a Dramatiq step reschedules instead of parking a thread.

``InMemoryRateLimiter`` has the same behaviour in one process (demo, unit tests).
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from worker.errors import RateLimited
from worker.log import get_logger

log = get_logger(__name__)

#: A provider asking for longer than this is treated as "come back in an hour", not believed.
MAX_BLOCK_S = 3600.0
#: Longest periods counted with the sliding window (one Redis key per second of the period).
MAX_WINDOW_S = 300


@dataclass(frozen=True)
class RateLimit:
    requests: int
    per: float  # seconds

    def __post_init__(self) -> None:
        if self.requests < 1 or self.per <= 0:
            raise ValueError("rate_limit needs requests >= 1 and per > 0")


class RateLimiter(Protocol):
    def register(self, provider: str, limit: RateLimit | None) -> None:
        """Declare (or replace) the provider's limit; unregistered providers are only blocked by 429s."""

    def acquire(self, provider: str) -> None:
        """Wait for a slot (bounded); raise ``RateLimited`` when none comes in time."""

    def block(self, provider: str, retry_after: float) -> None:
        """The provider answered 429: nobody calls it for ``retry_after`` seconds."""


class NoRateLimit:
    """For one-off CLI calls with no limiter configured: never waits."""

    def register(self, provider: str, limit: RateLimit | None) -> None:
        pass

    def acquire(self, provider: str) -> None:
        pass

    def block(self, provider: str, retry_after: float) -> None:
        pass


def _poll_wait(limit: RateLimit, rng: random.Random) -> float:
    # A slot frees at the earliest in per/requests seconds; poll about that often, jittered so
    # waiting workers do not stampede on the same instant.
    base = min(1.0, max(0.02, limit.per / limit.requests))
    return base * rng.uniform(0.5, 1.0)


class RedisRateLimiter:
    """Shared across processes through Redis (Dramatiq's rate limiters on its RedisBackend)."""

    _BLOCK_SCRIPT = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

    def __init__(
        self,
        client: Any,
        *,
        namespace: str = "keyrotor",
        max_wait: float = 5.0,
        sleep: Callable[[float], None] = time.sleep,
        now: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        from dramatiq.rate_limits.backends import RedisBackend

        self._client = client
        self._backend = RedisBackend(client=client)
        self._namespace = namespace
        self._max_wait = max_wait
        self._sleep = sleep
        self._now = now
        self._rng = rng or random.Random()
        self._limits: dict[str, tuple[RateLimit, Any]] = {}
        self._block = client.register_script(self._BLOCK_SCRIPT)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> "RedisRateLimiter":
        import redis

        return cls(redis.Redis.from_url(url), **kwargs)

    def _key(self, provider: str, suffix: str) -> str:
        return f"{self._namespace}:ratelimit:{provider}:{suffix}"

    def register(self, provider: str, limit: RateLimit | None) -> None:
        from dramatiq.rate_limits import BucketRateLimiter, WindowRateLimiter

        if limit is None:
            self._limits.pop(provider, None)
            return
        window = math.ceil(limit.per)
        # The key embeds the limit, so workers running an older inventory do not share counters
        # with a changed limit (each enforces what it was told).
        key = self._key(provider, f"window:{limit.requests}:{limit.per:g}")
        if limit.per >= 1 and window <= MAX_WINDOW_S and window == limit.per:
            counter: Any = WindowRateLimiter(self._backend, key, limit=limit.requests, window=window)
        else:
            counter = BucketRateLimiter(self._backend, key, limit=limit.requests, bucket=max(1, int(limit.per * 1000)))
        self._limits[provider] = (limit, counter)

    def blocked_for(self, provider: str) -> float:
        """Seconds until the provider may be called again after a 429 (0 when not blocked)."""
        raw = self._client.get(self._key(provider, "blocked_until"))
        if raw is None:
            return 0.0
        return max(0.0, float(raw) - self._now())

    def block(self, provider: str, retry_after: float) -> None:
        seconds = min(max(retry_after, 0.0), MAX_BLOCK_S)
        if seconds <= 0:
            return
        until = self._now() + seconds
        self._block(keys=[self._key(provider, "blocked_until")], args=[repr(until), int(seconds * 1000) + 1000])
        log.warning("provider_rate_limited", provider=provider, retry_after_s=round(seconds, 3))

    def acquire(self, provider: str) -> None:
        deadline = self._now() + self._max_wait
        entry = self._limits.get(provider)
        while True:
            wait = self.blocked_for(provider)
            if wait <= 0:
                if entry is None:
                    return
                limit, counter = entry
                with counter.acquire(raise_on_failure=False) as acquired:
                    if acquired:
                        return
                wait = _poll_wait(limit, self._rng)
                retry_after = max(wait, 1.0 if limit.per >= 1 else limit.per)
            else:
                retry_after = wait
            if self._now() + wait > deadline:
                raise RateLimited(f"rate limit of provider {provider!r} reached; retry in {retry_after:.1f}s", retry_after=retry_after)
            self._sleep(wait)


class InMemoryRateLimiter:
    """The same contract within one process: a sliding window of call times per provider."""

    def __init__(
        self,
        *,
        max_wait: float = 5.0,
        sleep: Callable[[float], None] = time.sleep,
        now: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._max_wait = max_wait
        self._sleep = sleep
        self._now = now
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._limits: dict[str, RateLimit] = {}
        self._calls: dict[str, deque[float]] = {}
        self._blocked_until: dict[str, float] = {}

    def register(self, provider: str, limit: RateLimit | None) -> None:
        with self._lock:
            if limit is None:
                self._limits.pop(provider, None)
            else:
                self._limits[provider] = limit

    def blocked_for(self, provider: str) -> float:
        with self._lock:
            return max(0.0, self._blocked_until.get(provider, 0.0) - self._now())

    def block(self, provider: str, retry_after: float) -> None:
        seconds = min(max(retry_after, 0.0), MAX_BLOCK_S)
        with self._lock:
            until = self._now() + seconds
            self._blocked_until[provider] = max(until, self._blocked_until.get(provider, 0.0))

    def _try(self, provider: str) -> float:
        """0 when a slot was taken, else seconds until one frees."""
        with self._lock:
            now = self._now()
            blocked = self._blocked_until.get(provider, 0.0) - now
            if blocked > 0:
                return blocked
            limit = self._limits.get(provider)
            if limit is None:
                return 0.0
            calls = self._calls.setdefault(provider, deque())
            while calls and calls[0] <= now - limit.per:
                calls.popleft()
            if len(calls) < limit.requests:
                calls.append(now)
                return 0.0
            return max(1e-3, calls[0] + limit.per - now)

    def acquire(self, provider: str) -> None:
        deadline = self._now() + self._max_wait
        while True:
            wait = self._try(provider)
            if wait <= 0:
                return
            if self._now() + wait > deadline:
                raise RateLimited(f"rate limit of provider {provider!r} reached; retry in {wait:.1f}s", retry_after=wait)
            self._sleep(wait)


def shared_limiter(redis_url: str, *, namespace: str = "keyrotor", max_wait: float = 5.0) -> RedisRateLimiter:
    """The limiter every worker uses: ``shared_limiter(settings.redis_url, namespace=settings.queue_namespace)``."""
    return RedisRateLimiter.from_url(redis_url, namespace=namespace, max_wait=max_wait)
