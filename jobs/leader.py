"""A Redis leader lock with a TTL that its holder renews, so one scheduler acts at a time.

- acquire: ``SET name token NX PX ttl`` with a token unique to this process;
- renew: a Lua compare-and-``PEXPIRE`` (only the holder of the token may extend it);
- release: a Lua compare-and-``DEL`` (never deletes a lock someone else took over).

``is_leader`` is local and conservative: it turns false as soon as a renewal fails or the TTL
might have lapsed since the last successful acquire/renew (measured from *before* the command
was sent, minus a clock-drift allowance). ``fence()`` adds a round trip to Redis and is called
before each job acts, so a paused process (GC, SIGSTOP, slow disk) that lost the lock while
asleep does not act on stale leadership.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from typing import Callable

import redis

from worker.log import get_logger

log = get_logger(__name__)

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def leader_lock_key(namespace: str) -> str:
    """The scheduler's lock key inside ``namespace`` (``KEYROTOR_QUEUE_NAMESPACE``): deployments
    sharing one Redis under different namespaces elect one leader each."""
    return f"{namespace}:scheduler:leader"


def make_token() -> str:
    """host:pid:random — unique per lock holder, and says who holds it when read by a person."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"



def _text(value: bytes | str) -> str:
    """A Redis reply as text, whether or not the client decodes replies itself."""
    return value if isinstance(value, str) else value.decode()

class LeaderLock:
    """One holder at a time for ``name``; call ``tick()`` every third of the TTL or more often."""

    def __init__(
        self,
        client: "redis.Redis",
        name: str,
        ttl_s: float,
        *,
        token: str | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError("the leader lock needs a positive TTL (KEYROTOR_SCHEDULER_LOCK_TTL_S)")
        self._client = client
        self.name = name
        self.ttl_ms = int(ttl_s * 1000)
        self.token = token or make_token()
        self._monotonic = monotonic
        self._valid_until: float | None = None  # monotonic deadline of our leadership, None = not held
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    # ------------------------------------------------------------------ state
    @property
    def is_leader(self) -> bool:
        """True only while a successful acquire/renew is younger than the TTL (minus drift)."""
        return self._valid_until is not None and self._monotonic() < self._valid_until

    def _validity_from(self, started: float) -> float:
        # Redlock's drift allowance: 1% of the TTL plus 2 ms, counted from before the command.
        drift_s = self.ttl_ms * 0.01 / 1000 + 0.002
        return started + self.ttl_ms / 1000 - drift_s

    # ------------------------------------------------------------------ operations
    def try_acquire(self) -> bool:
        """Take the lock if it is free; renew it if we already hold it."""
        if self._valid_until is not None:
            return self.renew()
        started = self._monotonic()
        try:
            taken = bool(self._client.set(self.name, self.token, nx=True, px=self.ttl_ms))
        except redis.RedisError as exc:
            log.warning("leader_lock_unreachable", lock=self.name, error=type(exc).__name__)
            return False
        if taken:
            self._valid_until = self._validity_from(started)
            log.info("leader_lock_acquired", lock=self.name, holder=self.token, ttl_ms=self.ttl_ms)
        return taken

    def renew(self) -> bool:
        """Extend our lock; on any failure leadership is dropped at once (no grace)."""
        if self._valid_until is None:
            return False
        started = self._monotonic()
        try:
            renewed = bool(self._renew(keys=[self.name], args=[self.token, self.ttl_ms]))
        except redis.RedisError as exc:
            log.warning("leader_lock_renew_failed", lock=self.name, error=type(exc).__name__)
            renewed = False
        if renewed and self._monotonic() < self._validity_from(started):
            self._valid_until = self._validity_from(started)
            return True
        self._lose("renewal failed" if not renewed else "renewal answered after the TTL")
        return False

    def fence(self) -> bool:
        """Check, right before acting, that we still hold the lock (local validity + Redis)."""
        if not self.is_leader:
            if self._valid_until is not None:
                self._lose("TTL may have lapsed since the last renewal")
            return False
        try:
            holder = self._client.get(self.name)
        except redis.RedisError as exc:
            log.warning("leader_lock_unreachable", lock=self.name, error=type(exc).__name__)
            self._lose("Redis unreachable")
            return False
        if holder is None or _text(holder) != self.token:
            self._lose("lock is held by someone else" if holder else "lock has expired")
            return False
        return self.is_leader

    def tick(self) -> bool:
        """Acquire or renew; returns whether we lead now."""
        return self.try_acquire()

    def release(self) -> None:
        """Give the lock up (graceful shutdown) so a standby takes over without waiting for the TTL."""
        held = self._valid_until is not None
        self._valid_until = None
        if not held:
            return
        try:
            self._release(keys=[self.name], args=[self.token])
            log.info("leader_lock_released", lock=self.name, holder=self.token)
        except redis.RedisError as exc:
            log.warning("leader_lock_release_failed", lock=self.name, error=type(exc).__name__)

    def holder(self) -> str | None:
        """Who holds the lock now (for status output), or None."""
        value = self._client.get(self.name)
        return _text(value) if value else None

    def _lose(self, why: str) -> None:
        if self._valid_until is not None:
            log.warning("leader_lock_lost", lock=self.name, holder=self.token, reason=why)
        self._valid_until = None
