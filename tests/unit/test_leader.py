"""Leader lock semantics on fakeredis (Lua via lupa): exclusivity, renewal, fencing, release."""

from __future__ import annotations

import fakeredis
import pytest

from jobs.leader import LeaderLock


class FakeMonotonic:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def client():  # type: ignore[no-untyped-def]
    return fakeredis.FakeRedis()


def test_only_one_holder_and_release_hands_over(client) -> None:  # type: ignore[no-untyped-def]
    a = LeaderLock(client, "lock", 10, token="a")
    b = LeaderLock(client, "lock", 10, token="b")
    assert a.try_acquire() and a.is_leader
    assert not b.try_acquire() and not b.is_leader
    assert client.pttl("lock") > 9000
    a.release()
    assert not a.is_leader and client.get("lock") is None
    assert b.try_acquire() and b.holder() == "b"


def test_renew_extends_ttl_only_for_the_holder(client) -> None:  # type: ignore[no-untyped-def]
    a = LeaderLock(client, "lock", 10, token="a")
    assert a.try_acquire()
    client.pexpire("lock", 500)
    assert a.renew()
    assert client.pttl("lock") > 9000
    # someone else took the lock (ours expired while we were paused): renewal must fail
    client.set("lock", "b", px=10000)
    assert not a.renew()
    assert not a.is_leader
    assert client.get("lock") == b"b"


def test_release_never_deletes_someone_elses_lock(client) -> None:  # type: ignore[no-untyped-def]
    a = LeaderLock(client, "lock", 10, token="a")
    assert a.try_acquire()
    client.set("lock", "b", px=10000)
    a.release()
    assert client.get("lock") == b"b"


def test_leadership_lapses_locally_when_renewals_stop(client) -> None:  # type: ignore[no-untyped-def]
    clock = FakeMonotonic()
    a = LeaderLock(client, "lock", 10, token="a", monotonic=clock)
    assert a.try_acquire()
    clock.t += 9.0
    assert a.is_leader and a.fence()
    clock.t += 0.95  # inside the TTL but past the drift allowance (1% + 2 ms): no longer trusted
    assert not a.is_leader
    assert not a.fence()


def test_fence_detects_a_lock_lost_in_redis(client) -> None:  # type: ignore[no-untyped-def]
    a = LeaderLock(client, "lock", 10, token="a")
    assert a.try_acquire()
    client.delete("lock")  # e.g. Redis failover lost the key
    assert not a.fence()
    assert not a.is_leader
    # and it can take it again on the next tick
    assert a.tick() and a.fence()


def test_redis_down_means_not_leader() -> None:
    import redis

    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    lock = LeaderLock(dead, "lock", 10, token="a")
    assert not lock.try_acquire()
    assert not lock.is_leader


def test_rejects_a_non_positive_ttl(client) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="TTL"):
        LeaderLock(client, "lock", 0)
