"""A provider's rate limit, shared by every worker.

``RedisRateLimiter`` keeps an exact sliding-window log of call times per provider in a Redis
sorted set, updated atomically by one Lua script on Redis's own clock, so N workers on N hosts
together stay under ``rate_limit {requests, per}`` in *every* window of ``per`` seconds. (Dramatiq's
``WindowRateLimiter`` counts per-second buckets, which lets up to twice the limit through across a
bucket boundary for short periods — and providers such as the Alloy-style stand-in enforce a true
sliding window, so that burst came back as 429s.) When a provider still answers 429,
``block(provider, retry_after)`` records ``<namespace>:ratelimit:<provider>:blocked_until`` and
every worker's ``acquire`` waits it out. ``acquire`` waits at most ``max_wait`` seconds, then
raises ``RateLimited(retry_after=…)`` so a Dramatiq step reschedules instead of parking a thread.

A provider's limits are *buckets*: the provider's own name, and ``provider/group`` for each
endpoint group the inventory declares (``worker/providers/limits.py`` maps a request to its
buckets). Each bucket may also have a concurrency limit: ``hold(bucket)`` takes one of N leases
shared by every worker (a Redis sorted set of lease ids scored by their expiry, so a worker that
dies mid-request frees its lease when it expires) and gives it back when the request ends.

``InMemoryRateLimiter`` has the same behaviour in one process (demo, unit tests).
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

from worker.errors import RateLimited
from worker.log import get_logger
from worker.redis_conn import redis_client

log = get_logger(__name__)

#: A provider asking for longer than this is treated as "come back in an hour", not believed.
MAX_BLOCK_S = 3600.0
#: Largest safety margin added to a rate-limit period (see ``RedisRateLimiter._try_slot``).
WINDOW_MARGIN_S = 0.25
#: A concurrency lease outlives the longest request by this much (a dead worker's lease expires).
LEASE_MARGIN_S = 5.0
#: How long to wait before looking again for a free concurrency lease.
LEASE_POLL_S = 0.05


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

    def register_concurrency(self, bucket: str, limit: int | None, lease_s: float) -> None:
        """At most ``limit`` requests of ``bucket`` in flight at once, all workers together; a
        lease is held at most ``lease_s`` seconds (longer than any request may take)."""

    def hold(self, bucket: str) -> Any:
        """Context manager: wait (bounded) for a concurrency lease of ``bucket``, release on exit;
        raises ``RateLimited`` when none frees in time. No limit registered: never waits."""


def _concurrency_exhausted(bucket: str, limit: int, retry_after: float) -> RateLimited:
    return RateLimited(f"concurrency limit of {bucket!r} ({limit} requests in flight) reached; "
                       f"retry in {retry_after:.1f}s", retry_after=retry_after)


class RedisRateLimiter:
    """Shared across processes through Redis: a sliding-window log per provider."""

    #: KEYS[1] the provider's log (ZSET of call times, µs); ARGV: limit, period (µs), member suffix.
    #: Returns 0 when a slot was taken, else microseconds until the oldest call leaves the window.
    _ACQUIRE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local limit = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - period)
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now, now .. ':' .. ARGV[3])
  redis.call('PEXPIRE', KEYS[1], math.ceil(period / 1000) + 1000)
  return 0
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return math.max(1, tonumber(oldest[2]) + period - now)
"""

    _BLOCK_SCRIPT = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

    #: KEYS[1] the bucket's leases (ZSET lease id → expiry, µs); ARGV: limit, lease (µs), lease id.
    #: Returns 1 when the lease was taken, else 0.
    _LEASE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
  redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) / 1000) + 1000)
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
        self._client = client
        self._namespace = namespace
        self._max_wait = max_wait
        self._sleep = sleep
        self._now = now
        self._rng = rng or random.Random()
        self._limits: dict[str, RateLimit] = {}
        self._concurrency: dict[str, tuple[int, float]] = {}
        self._acquire_slot = client.register_script(self._ACQUIRE_SCRIPT)
        self._block = client.register_script(self._BLOCK_SCRIPT)
        self._take_lease = client.register_script(self._LEASE_SCRIPT)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> "RedisRateLimiter":
        # A hung Redis must not hang a rotation step: every call gives up after a few seconds.
        return cls(redis_client(url, socket_timeout=5), **kwargs)

    def _key(self, provider: str, suffix: str) -> str:
        return f"{self._namespace}:ratelimit:{provider}:{suffix}"

    def register(self, provider: str, limit: RateLimit | None) -> None:
        if limit is None:
            self._limits.pop(provider, None)
        else:
            self._limits[provider] = limit

    def _window_key(self, provider: str, limit: RateLimit) -> str:
        # The key embeds the limit, so workers running an older inventory do not share a log
        # with a changed limit (each enforces what it was told).
        return self._key(provider, f"window:{limit.requests}:{limit.per:g}")

    def _try_slot(self, provider: str, limit: RateLimit) -> float:
        """0 when a slot was taken, else seconds until one frees."""
        member = f"{os.getpid()}:{threading.get_ident()}:{self._rng.random():.12f}"
        # A small margin on the period absorbs the jitter between our admission time and the
        # provider's arrival time, so a call admitted at a window edge is not refused over there.
        period = limit.per + min(limit.per * 0.05, WINDOW_MARGIN_S)
        wait_us = self._acquire_slot(
            keys=[self._window_key(provider, limit)], args=[limit.requests, int(period * 1_000_000), member]
        )
        return int(wait_us) / 1_000_000

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
        limit = self._limits.get(provider)
        while True:
            wait = self.blocked_for(provider)
            if wait <= 0:
                if limit is None:
                    return
                wait = self._try_slot(provider, limit)
                if wait <= 0:
                    return
                # Jitter so workers waiting for the same slot do not stampede on one instant.
                wait *= self._rng.uniform(1.0, 1.2)
            if self._now() + wait > deadline:
                raise RateLimited(f"rate limit of provider {provider!r} reached; retry in {wait:.1f}s", retry_after=wait)
            self._sleep(wait)

    def register_concurrency(self, bucket: str, limit: int | None, lease_s: float) -> None:
        if limit is None:
            self._concurrency.pop(bucket, None)
        else:
            self._concurrency[bucket] = (limit, lease_s)

    def _lease_key(self, bucket: str, limit: int) -> str:
        # The key embeds the limit, as the window key does: workers on an older inventory keep their own.
        return self._key(bucket, f"leases:{limit}")

    def in_flight(self, bucket: str) -> int:
        """Unexpired leases of ``bucket`` held now (tests, status); 0 when it has no limit."""
        registered = self._concurrency.get(bucket)
        if registered is None:
            return 0
        seconds, micros = self._client.time()
        return int(self._client.zcount(self._lease_key(bucket, registered[0]), f"({seconds * 1_000_000 + micros}", "+inf"))

    @contextmanager
    def hold(self, bucket: str) -> Iterator[None]:
        registered = self._concurrency.get(bucket)
        if registered is None:
            yield
            return
        limit, lease_s = registered
        key = self._lease_key(bucket, limit)
        lease = f"{os.getpid()}:{threading.get_ident()}:{uuid.uuid4().hex}"
        deadline = self._now() + self._max_wait
        while not int(self._take_lease(keys=[key], args=[limit, int(lease_s * 1_000_000), lease])):
            if self._now() + LEASE_POLL_S > deadline:
                raise _concurrency_exhausted(bucket, limit, 1.0)
            self._sleep(LEASE_POLL_S * self._rng.uniform(1.0, 2.0))
        try:
            yield
        finally:
            try:
                self._client.zrem(key, lease)
            except Exception as exc:  # the lease expires on its own; never mask the request's outcome
                log.warning("concurrency_release_failed", bucket=bucket, error=type(exc).__name__)


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
        self._concurrency: dict[str, int] = {}
        self._held: dict[str, int] = {}

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

    def register_concurrency(self, bucket: str, limit: int | None, lease_s: float) -> None:
        with self._lock:
            if limit is None:
                self._concurrency.pop(bucket, None)
            else:
                self._concurrency[bucket] = limit

    def in_flight(self, bucket: str) -> int:
        with self._lock:
            return self._held.get(bucket, 0)

    def _take_lease(self, bucket: str) -> bool:
        with self._lock:
            limit = self._concurrency.get(bucket)
            if limit is None:
                return True
            if self._held.get(bucket, 0) >= limit:
                return False
            self._held[bucket] = self._held.get(bucket, 0) + 1
            return True

    @contextmanager
    def hold(self, bucket: str) -> Iterator[None]:
        deadline = self._now() + self._max_wait
        while not self._take_lease(bucket):
            if self._now() + LEASE_POLL_S > deadline:
                raise _concurrency_exhausted(bucket, self._concurrency.get(bucket, 0), 1.0)
            self._sleep(LEASE_POLL_S)
        try:
            yield
        finally:
            with self._lock:
                if bucket in self._held:
                    self._held[bucket] = max(0, self._held[bucket] - 1)


def shared_limiter(redis_url: str, *, namespace: str = "keyrotor", max_wait: float = 5.0) -> RedisRateLimiter:
    """The limiter every worker uses: ``shared_limiter(settings.redis_url, namespace=settings.queue_namespace)``."""
    return RedisRateLimiter.from_url(redis_url, namespace=namespace, max_wait=max_wait)
