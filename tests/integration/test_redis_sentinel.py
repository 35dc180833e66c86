"""keyrotor's Redis clients on a real Sentinel deployment (tests/sentinel_cluster.py): each finds
the master through the sentinels, follows a failover to the promoted replica, and says so in one
line when no sentinel answers. The failover during rotations is tests/e2e/test_redis_sentinel_failover.py."""

from __future__ import annotations

import time
import uuid
from typing import Any, Callable, TypeVar

import pytest

from jobs.leader import LeaderLock, leader_lock_key
from tests.sentinel_cluster import SentinelCluster, sentinel_cluster  # noqa: F401  (fixture)
from worker.cli.common import redis_reachable
from worker.connectivity import check_redis
from worker.errors import RateLimited
from worker.providers.ratelimit import RateLimit, RedisRateLimiter
from worker.redis_conn import redis_client
from worker.settings import load_settings

pytestmark = pytest.mark.integration
T = TypeVar("T")


def eventually(action: Callable[[], T], timeout: float = 20.0) -> T:
    """The first call after a failover may meet the dead master once; then the new one answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return action()
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def served_by(client: Any) -> int:
    return int(client.info("server")["tcp_port"])


def test_every_client_reaches_the_master_and_follows_a_failover(sentinel_cluster: SentinelCluster) -> None:  # noqa: F811
    cluster, url = sentinel_cluster, sentinel_cluster.url
    namespace = f"krtest-{uuid.uuid4().hex[:8]}"
    first = cluster.master_port()

    client = redis_client(url, socket_timeout=2)
    assert served_by(client) == first
    client.set(f"{namespace}:written-before", "1")

    lock = LeaderLock(redis_client(url, socket_timeout=2), leader_lock_key(namespace), ttl_s=30)
    assert lock.tick() and lock.fence()
    limiter = RedisRateLimiter.from_url(url, namespace=namespace, max_wait=0)
    limiter.register("alloy", RateLimit(3, 60.0))
    limiter.acquire("alloy")
    assert redis_reachable(url, timeout=2.0)
    check = check_redis(load_settings(redis_url=url), timeout_s=2.0)
    assert check.ok and check.detail.endswith(f"PING answered by master 127.0.0.1:{first}, Redis "
                                              + client.info("server")["redis_version"])
    # Give the replica the writes above (a failover loses what it has not received: see the docs).
    client.wait(1, 2000)

    old = cluster.kill_master()
    new = cluster.wait_for_failover(old)
    assert new != old

    # The same client objects, no restart: the next commands go to the promoted replica.
    assert eventually(lambda: served_by(client)) == new
    assert client.get(f"{namespace}:written-before") == b"1"
    client.set(f"{namespace}:written-after", "1")
    # The lock was replicated: its holder keeps leading, and fencing reads it on the new master.
    eventually(lambda: _leads(lock))
    assert lock.fence()
    assert lock.holder() == lock.token
    # The rate-limit window carried over too: 1 of 3 used before, 2 left after.
    eventually(lambda: limiter.acquire("alloy"))
    limiter.acquire("alloy")
    with pytest.raises(RateLimited):
        limiter.acquire("alloy")
    assert redis_reachable(url, timeout=2.0)
    assert check_redis(load_settings(redis_url=url), timeout_s=2.0).ok
    client.close()


def test_a_lost_leader_lock_is_noticed_and_taken_again(sentinel_cluster: SentinelCluster) -> None:  # noqa: F811
    """The worst case of asynchronous replication: the lock key never reached the replica. The
    holder's fence finds it gone (it stops acting), and the next tick takes it again."""
    cluster, url = sentinel_cluster, sentinel_cluster.url
    namespace = f"krtest-{uuid.uuid4().hex[:8]}"
    lock = LeaderLock(redis_client(url, socket_timeout=2), leader_lock_key(namespace), ttl_s=30)
    assert lock.tick()
    replica = next(port for port in cluster.redis_ports if port != cluster.master_port())
    # Make the promoted replica forget the lock, as if the last writes never reached it.
    old = cluster.kill_master()
    cluster.wait_for_failover(old)
    with cluster.node(replica) as node:
        node.delete(leader_lock_key(namespace))
    eventually(lambda: _fenced_off(lock))
    assert not lock.is_leader
    eventually(lambda: _leads(lock))
    assert lock.fence() and lock.holder() == lock.token


def _leads(lock: LeaderLock) -> None:
    if not lock.tick():
        raise RuntimeError("not leading (yet)")


def _fenced_off(lock: LeaderLock) -> None:
    if lock.fence():
        raise RuntimeError("still leading")


def test_no_sentinel_answering_is_one_clear_line_in_bounded_time(sentinel_cluster: SentinelCluster) -> None:  # noqa: F811
    cluster, url = sentinel_cluster, sentinel_cluster.url
    for port in cluster.sentinel_ports:
        cluster.procs[port].kill()
        cluster.procs[port].wait(timeout=10)
    assert not redis_reachable(url, timeout=0.5)
    check = check_redis(load_settings(redis_url=url), timeout_s=0.5)
    assert not check.ok and "\n" not in check.detail
    assert check.detail.startswith(f"{url} does not answer PING: ")
    assert "mymaster" not in check.detail and "krmaster" in check.detail  # names the master it looked for
