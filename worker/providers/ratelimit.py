"""A provider's rate limit, shared by every worker.

``RedisRateLimiter`` keeps an exact sliding-window log per provider in a Redis sorted set, updated
atomically by Lua scripts on Redis's own clock, so N workers on N hosts together stay under
``rate_limit {requests, per}`` in *every* window of ``per`` seconds as the provider counts it.
(Dramatiq's ``WindowRateLimiter`` counts per-second buckets, which lets up to twice the limit
through across a bucket boundary — and providers such as the Alloy-style stand-in enforce a true
sliding window.)

What the provider counts is the moment a request *arrives*, which keyrotor cannot see: it lies
somewhere between the slot being taken (``s``) and the answer coming back (``e``). So each logged
request is scored by its end: taken with a provisional end ``s + hold`` (the longest it may be in
flight), lowered to its real ``e`` by ``release`` when the answer is in. A new request is admitted
at ``s'`` only when fewer than ``requests`` logged requests end after ``s' − per``. Then no window
of ``per`` at the provider can hold more than ``requests`` arrivals, whatever the latency, the
time spent between taking the slot and sending, or the provider's clock offset (only intervals
matter): any earlier request arriving within ``per`` of the new one ended after ``s' − per``. The
budget left unused is only each request's own round trip (``per + latency`` per ``requests``
calls), not a margin guessed for the worst jitter. ``window_margin`` adds a hair for the two
clocks' rates and rounding.

When a provider still answers 429, ``block(provider, retry_after)`` records
``<namespace>:ratelimit:<provider>:blocked_until`` (Redis's clock) and every worker's ``acquire``
waits it out. ``acquire`` waits at most ``max_wait`` seconds, then raises
``RateLimited(retry_after=…)`` so a Dramatiq step reschedules instead of parking a thread.

A provider's limits are *buckets*: the provider's own name, and ``provider/group`` for each
endpoint group the inventory declares (``worker/providers/limits.py`` maps a request to its
buckets). ``acquire(*buckets)`` takes a slot in all of them at once or in none. Each bucket may also
have a concurrency limit: ``hold(bucket)`` takes one of N leases shared by every worker (a Redis
sorted set of lease ids scored by their expiry, so a worker that dies mid-request frees its lease
when it expires) and gives it back when the request ends.

``InMemoryRateLimiter`` has the same behaviour in one process (demo, unit tests).
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

from worker.errors import RateLimited
from worker.log import get_logger
from worker.redis_conn import redis_client

log = get_logger(__name__)

#: A provider asking for longer than this is treated as "come back in an hour", not believed.
MAX_BLOCK_S = 3600.0
#: Largest safety margin added to a rate-limit period (see ``window_margin``).
WINDOW_MARGIN_S = 0.25
#: Added to a request's measured end: rounding to microseconds and two clocks' readings.
CLOCK_SLACK_S = 0.0005
#: How soon to look again when every counted request is still in flight (its end is unknown).
IN_FLIGHT_POLL_S = 0.02
#: At most this much random delay on top of a computed wait (workers waiting for one slot).
WAKE_JITTER_S = 0.005
#: A concurrency lease outlives the longest request by this much (a dead worker's lease expires).
LEASE_MARGIN_S = 5.0
#: How long to wait before looking again for a free concurrency lease.
LEASE_POLL_S = 0.05
#: The shared limiter's releases wait at most this long to ride along with this process's next
#: acquire (see ``RedisRateLimiter``); a flusher thread sends what is left after it.
RELEASE_DELAY_S = 0.05
#: A release is deferred only when every window it is in is at least this many delays long.
RELEASE_DELAY_PERIODS = 10


@dataclass(frozen=True)
class RateLimit:
    requests: int
    per: float  # seconds

    def __post_init__(self) -> None:
        if self.requests < 1 or self.per <= 0:
            raise ValueError("rate_limit needs requests >= 1 and per > 0")


def window_margin(per: float) -> float:
    """Added to the period: the provider's clock may run up to 0.1 % faster than Redis's (NTP
    allows 0.05 %), plus a millisecond of rounding. Arrival jitter needs none (requests are
    logged by their end)."""
    return min(0.001 + per * 0.001, WINDOW_MARGIN_S)


@dataclass(frozen=True)
class Ticket:
    """A taken slot: the buckets it counts in, its log member, Redis's time when it was taken (s)
    and this process's monotonic clock just before asking (s)."""

    buckets: tuple[str, ...]
    member: str
    started: float
    called: float


class RateLimiter(Protocol):
    def register(self, provider: str, limit: RateLimit | None) -> None:
        """Declare (or replace) the provider's limit; unregistered providers are only blocked by 429s."""

    def acquire(self, *buckets: str, hold_s: float = 0.0) -> Ticket:
        """Wait (bounded) for a slot in every bucket at once; raise ``RateLimited`` when none comes
        in time. The slot counts as in flight until ``release`` (at most ``hold_s``); with the
        default 0 it ends at once (a caller that does not report the answer)."""

    def release(self, ticket: Ticket) -> None:
        """The ticket's request has ended: its slot leaves the window ``per`` seconds from now."""

    def slot(self, *buckets: str, hold_s: float) -> Any:
        """Context manager: ``acquire`` then ``release`` around one request (send at once inside)."""

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


class _SlotAroundRequest:
    """``slot``: ``acquire`` then ``release`` around one request, for both limiters."""

    def acquire(self, *buckets: str, hold_s: float = 0.0) -> Ticket:
        raise NotImplementedError

    def release(self, ticket: Ticket) -> None:
        raise NotImplementedError

    @contextmanager
    def slot(self, *buckets: str, hold_s: float) -> Iterator[None]:
        ticket = self.acquire(*buckets, hold_s=hold_s)
        try:
            yield
        finally:
            self.release(ticket)


class RedisRateLimiter(_SlotAroundRequest):
    """Shared across processes through Redis: a sliding-window log per bucket, scored by each
    request's *end* (see the module docstring).

    With ``release_delay_s`` (the shared limiter's), a release is not sent on its own: it rides
    along with this process's next acquire, in the same script call, or a flusher thread sends it
    ``release_delay_s`` later. That halves the limiter's Redis calls per request and admits nothing
    sooner: the end it records is taken when the request ends, and until it is sent the entry
    counts as in flight, which counts in every window that the real end counts in as long as the
    delay is shorter than the window (``RELEASE_DELAY_PERIODS``). But a worker that finds the window
    full then waits for the oldest entry it can see to leave, possibly a later one than the unsent
    end: so once the process's last acquire found a window at least half full, releases go at once
    again (an emergency at the provider's limit spends its whole budget as before)."""

    #: KEYS: the buckets' ``blocked_until`` keys (ARGV[1] of them), then their window logs (ZSET
    #: member → end of the request, µs), then the window log of each deferred release (ARGV[5] of
    #: them). ARGV: count of blocked keys, member, hold (µs), poll (µs), count of deferred releases,
    #: (member, end µs) per deferred release, then (limit, period µs) per window. The deferred
    #: releases are applied first (as ``_RELEASE_SCRIPT``). Returns {0, now, crowded} when a slot was
    #: taken in *every* window (all or none; crowded: 1 when one of them was at least half full),
    #: else {1, µs to wait}.
    _ACQUIRE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local blocked = tonumber(ARGV[1])
local hold = tonumber(ARGV[3])
local released = tonumber(ARGV[5])
local windows_end = #KEYS - released
for i = 1, released do
  local key, member = KEYS[windows_end + i], ARGV[4 + i * 2]
  local ended = math.min(tonumber(ARGV[5 + i * 2]), now)
  local score = redis.call('ZSCORE', key, member)
  if score and tonumber(score) > ended then
    redis.call('ZADD', key, 'XX', ended, member)
  end
end
local first_limit = 6 + released * 2
local wait = 0
local crowded = 0
for i = 1, blocked do
  local until_s = tonumber(redis.call('GET', KEYS[i]) or '0')
  if until_s * 1000000 > now then wait = math.max(wait, until_s * 1000000 - now) end
end
if wait > 0 then return {1, math.ceil(wait)} end
for i = blocked + 1, windows_end do
  local j = first_limit + (i - blocked - 1) * 2
  local limit, period = tonumber(ARGV[j]), tonumber(ARGV[j + 1])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - period)
  local counted = redis.call('ZCARD', KEYS[i])
  if counted * 2 >= limit then crowded = 1 end
  if counted >= limit then
    local oldest = tonumber(redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')[2])
    if oldest > now + tonumber(ARGV[4]) then
      wait = math.max(wait, tonumber(ARGV[4]))  -- every counted request still in flight: look again soon
    else
      wait = math.max(wait, oldest + period - now)
    end
  end
end
if wait > 0 then return {1, math.max(1, math.ceil(wait))} end
for i = blocked + 1, windows_end do
  local j = first_limit + (i - blocked - 1) * 2
  redis.call('ZADD', KEYS[i], now + hold, ARGV[2])
  redis.call('PEXPIRE', KEYS[i], math.ceil((tonumber(ARGV[j + 1]) + hold) / 1000) + 1000)
end
return {0, now, crowded}
"""

    #: KEYS: window logs; ARGV: per key, the member and the client's bound on its request's end
    #: (µs). Lowers each entry's end to the earlier of that bound and now (both are at or after the
    #: real end); never raises one, so sending a release twice changes nothing.
    _RELEASE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
for i = 1, #KEYS do
  local member, ended = ARGV[i * 2 - 1], math.min(tonumber(ARGV[i * 2]), now)
  local score = redis.call('ZSCORE', KEYS[i], member)
  if score and tonumber(score) > ended then
    redis.call('ZADD', KEYS[i], 'XX', ended, member)
  end
end
return 0
"""

    #: KEYS[1] blocked_until (seconds, Redis's clock); ARGV: seconds to block. Never shortens a block.
    _BLOCK_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local until_s = now + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if until_s > current then
  redis.call('SET', KEYS[1], string.format('%.6f', until_s), 'PX', math.ceil(tonumber(ARGV[1]) * 1000) + 1000)
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
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        release_delay_s: float = 0.0,
    ) -> None:
        self._client = client
        self._namespace = namespace
        self._max_wait = max_wait
        self._sleep = sleep
        self._now = now
        self._monotonic = monotonic
        self._rng = rng or random.Random()
        self._release_delay_s = release_delay_s
        self._deferred: list[tuple[str, str, int]] = []  # (window key, member, end µs) not sent yet
        self._deferred_added = threading.Condition()
        self._flusher: threading.Thread | None = None
        self._crowded = False  # the last acquire found a window at least half full (or full)
        self._limits: dict[str, RateLimit] = {}
        self._concurrency: dict[str, tuple[int, float]] = {}
        self._acquire_slot = client.register_script(self._ACQUIRE_SCRIPT)
        self._release_slot = client.register_script(self._RELEASE_SCRIPT)
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
        # with a changed limit (each enforces what it was told). "ends" marks the log's meaning
        # (scores are request ends), apart from the admission-time logs of older workers.
        return self._key(provider, f"ends:{limit.requests}:{limit.per:g}")

    def _try_slot(self, buckets: tuple[str, ...], member: str, hold_s: float) -> tuple[bool, float]:
        """(True, Redis time in s) when a slot was taken in every bucket, else (False, seconds until one may free)."""
        windows = [(self._window_key(b, self._limits[b]), self._limits[b]) for b in buckets if b in self._limits]
        deferred = self._take_deferred()
        keys = ([self._key(b, "blocked_until") for b in buckets] + [key for key, _ in windows]
                + [key for key, _, _ in deferred])
        args: list[Any] = [len(buckets), member, int(hold_s * 1_000_000), int(IN_FLIGHT_POLL_S * 1_000_000), len(deferred)]
        for _key, released, end_us in deferred:
            args += [released, end_us]
        for _key, limit in windows:
            args += [limit.requests, int((limit.per + window_margin(limit.per)) * 1_000_000)]
        try:
            answer = self._acquire_slot(keys=keys, args=args)
        except Exception:
            self._defer(deferred)  # sent again later: a release applied twice changes nothing
            raise
        taken = int(answer[0]) == 0
        # Near the limit a release goes at once (see the class docstring); written by any thread,
        # read by any: a stale value only sends one release sooner or later than it could.
        self._crowded = not taken or int(answer[2]) == 1
        return taken, int(answer[1]) / 1_000_000

    def blocked_for(self, provider: str) -> float:
        """Seconds until the provider may be called again after a 429 (0 when not blocked)."""
        raw = self._client.get(self._key(provider, "blocked_until"))
        if raw is None:
            return 0.0
        seconds, micros = self._client.time()
        return max(0.0, float(raw) - (seconds + micros / 1_000_000))

    def block(self, provider: str, retry_after: float) -> None:
        seconds = min(max(retry_after, 0.0), MAX_BLOCK_S)
        if seconds <= 0:
            return
        self._block(keys=[self._key(provider, "blocked_until")], args=[repr(seconds)])
        log.warning("provider_rate_limited", provider=provider, retry_after_s=round(seconds, 3))

    def acquire(self, *buckets: str, hold_s: float = 0.0) -> Ticket:
        """A slot in every bucket at once (or none: a full group never wastes the provider's slot).
        The slot counts until ``release`` (at most ``hold_s`` seconds from now)."""
        deadline = self._monotonic() + self._max_wait
        member = f"{os.getpid()}:{threading.get_ident()}:{uuid.uuid4().hex[:16]}"
        while True:
            called = self._monotonic()
            taken, value = self._try_slot(buckets, member, hold_s)
            if taken:
                return Ticket(tuple(b for b in buckets if b in self._limits), member, value, called)
            # A little jitter so workers waiting for the same slot do not all ask at one instant.
            wait = value + self._rng.uniform(0.0, min(value * 0.1, WAKE_JITTER_S))
            if self._monotonic() + wait > deadline:
                raise RateLimited(f"rate limit of {buckets[0]!r} reached; retry in {value:.1f}s", retry_after=value)
            self._sleep(wait)

    def release(self, ticket: Ticket) -> None:
        """The ticket's request has ended (answered or given up on): its slot counts until now."""
        if not ticket.buckets:
            return
        # Redis's time at admission plus what this process has seen elapse since it asked: never
        # earlier than the request's real end, and not delayed by this call's own latency (the
        # script keeps the earlier of it and Redis's time when it runs; both bound the end).
        end_us = int((ticket.started + (self._monotonic() - ticket.called) + CLOCK_SLACK_S) * 1_000_000)
        limits = [(b, self._limits[b]) for b in ticket.buckets if b in self._limits]
        ended = [(self._window_key(b, limit), ticket.member, end_us) for b, limit in limits]
        if not ended:
            return
        if self._release_delay_s > 0 and not self._crowded and all(
                limit.per >= RELEASE_DELAY_PERIODS * self._release_delay_s for _b, limit in limits):
            self._defer(ended)
        else:
            self._send_releases(ended)

    def flush_releases(self) -> None:
        """Send every deferred release now (the flusher thread, a worker's shutdown, tests)."""
        deferred = self._take_deferred()
        if deferred:
            self._send_releases(deferred)

    def _send_releases(self, ended: list[tuple[str, str, int]]) -> None:
        args: list[Any] = []
        for _key, member, end_us in ended:
            args += [member, end_us]
        try:
            self._release_slot(keys=[key for key, _, _ in ended], args=args)
        except Exception as exc:  # the slots then count until their hold runs out: late, never early
            log.warning("rate_slot_release_failed", releases=len(ended), error=type(exc).__name__)

    def _take_deferred(self) -> list[tuple[str, str, int]]:
        with self._deferred_added:
            deferred, self._deferred = self._deferred, []
        return deferred

    def _defer(self, ended: list[tuple[str, str, int]]) -> None:
        if not ended:
            return
        with self._deferred_added:
            self._deferred.extend(ended)
            self._deferred_added.notify()
            if self._flusher is None:
                _DEFERRING.add(self)
                self._flusher = threading.Thread(target=self._flush_after_delay, name="keyrotor-rate-releases",
                                                 daemon=True)
                self._flusher.start()

    def _flush_after_delay(self) -> None:
        """Sends what no acquire carried within ``release_delay_s`` (an idle process's last ones)."""
        while True:
            with self._deferred_added:
                while not self._deferred:
                    self._deferred_added.wait()
            time.sleep(self._release_delay_s)
            self.flush_releases()

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


class InMemoryRateLimiter(_SlotAroundRequest):
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
        self._calls: dict[str, dict[str, float]] = {}  # bucket → member → end of its request
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

    def _try(self, buckets: tuple[str, ...], member: str, hold_s: float) -> float:
        """0 when a slot was taken in every bucket, else seconds until one may free."""
        with self._lock:
            now = self._now()
            wait = max([self._blocked_until.get(b, 0.0) - now for b in buckets] + [0.0])
            if wait > 0:
                return wait
            limited = [(b, self._limits[b]) for b in buckets if b in self._limits]
            for bucket, limit in limited:
                ends = self._calls.setdefault(bucket, {})
                for gone in [m for m, end in ends.items() if end <= now - limit.per]:
                    del ends[gone]
                if len(ends) >= limit.requests:
                    oldest = min(ends.values())
                    in_flight = oldest > now + IN_FLIGHT_POLL_S  # its end is not known yet: look again soon
                    wait = max(wait, IN_FLIGHT_POLL_S if in_flight else max(1e-3, oldest + limit.per - now))
            if wait > 0:
                return wait
            for bucket, _limit in limited:
                self._calls[bucket][member] = now + hold_s
            return 0.0

    def acquire(self, *buckets: str, hold_s: float = 0.0) -> Ticket:
        deadline = self._now() + self._max_wait
        member = uuid.uuid4().hex
        while True:
            wait = self._try(buckets, member, hold_s)
            if wait <= 0:
                return Ticket(tuple(buckets), member, 0.0, 0.0)
            if self._now() + wait > deadline:
                raise RateLimited(f"rate limit of {buckets[0]!r} reached; retry in {wait:.1f}s", retry_after=wait)
            self._sleep(wait)

    def release(self, ticket: Ticket) -> None:
        with self._lock:
            now = self._now()
            for bucket in ticket.buckets:
                ends = self._calls.get(bucket, {})
                if ends.get(ticket.member, now) > now:
                    ends[ticket.member] = now

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


#: Limiters holding deferred releases, flushed by ``flush_all_releases`` when a worker stops.
_DEFERRING: "weakref.WeakSet[RedisRateLimiter]" = weakref.WeakSet()


def flush_all_releases() -> None:
    """Send every deferred release of this process (a stopping worker: its last requests' slots
    then end when they did, not when their hold runs out)."""
    for limiter in list(_DEFERRING):
        limiter.flush_releases()


def shared_limiter(redis_url: str, *, namespace: str = "keyrotor", max_wait: float = 5.0) -> RedisRateLimiter:
    """The limiter every worker uses: ``shared_limiter(settings.redis_url, namespace=settings.queue_namespace)``."""
    return RedisRateLimiter.from_url(redis_url, namespace=namespace, max_wait=max_wait, release_delay_s=RELEASE_DELAY_S)
