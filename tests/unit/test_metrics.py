"""What /metrics says: one count per provider request; the scheduler's leader-only gauges cleared on
step-down; /healthz reflects the worker's problems."""

from __future__ import annotations

import itertools
import json
import uuid
from typing import Any

import httpx
from prometheus_client import REGISTRY

from tests.fakes_pipeline import FakeProvider, World
from worker import metrics
from worker.protocol.states import RunState
from worker.inventory.schema import HttpProviderSpec
from worker.providers.ratelimit import InMemoryRateLimiter
from worker.providers.registry import build_provider
from worker.secret import Secret

SPEC = {
    "kind": "http", "mode": "overlap", "base_url": "https://api.example.test/",
    "rate_limit": {"requests": 100, "per": "1s"},
    "auth": {"type": "bearer", "token": {"env": "ADMIN"}},
    "credential_types": {"api_key": {}},
    "calls": {
        "issue": {"method": "post", "url": "{base_url}/keys", "body": {"name": "{key_name}"},
                  "response": {"secret": "$.data.key", "key_id": "$.data.id"}},
        "verify": {"url": "{base_url}/me", "auth": {"type": "header", "name": "apiKey", "value": "{secret}"}},
        "revoke": {"method": "DELETE", "url": "{base_url}/keys/{key_id}"},
        "list": {"url": "{base_url}/keys", "response": {"items": "$.keys", "key_id": "$.id", "name": "$.name"}},
    },
}


class ProviderApi:
    """A tiny provider API behind httpx.MockTransport: keys by id, each valid until revoked."""

    def __init__(self) -> None:
        self.keys: dict[str, dict[str, Any]] = {}
        self.requests = 0
        self._ids = itertools.count(100)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        path = request.url.path
        if request.method == "POST" and path == "/keys":
            key_id = str(next(self._ids))
            name = json.loads(request.read())["name"]
            self.keys[key_id] = {"id": key_id, "name": name, "secret": f"sk_live_{uuid.uuid4().hex}", "valid": True}
            return httpx.Response(201, json={"data": {"key": self.keys[key_id]["secret"], "id": key_id}})
        if request.method == "GET" and path == "/me":
            ok = any(k["valid"] and k["secret"] == request.headers.get("apiKey") for k in self.keys.values())
            return httpx.Response(200 if ok else 401, json={})
        if request.method == "DELETE" and path.startswith("/keys/"):
            key = self.keys.get(path.rsplit("/", 1)[1])
            if key is None:
                return httpx.Response(404, json={})
            key["valid"] = False
            return httpx.Response(204)
        if request.method == "GET" and path == "/keys":
            return httpx.Response(200, json={"keys": [{"id": k["id"], "name": k["name"]} for k in self.keys.values()
                                                      if k["valid"]]})
        return httpx.Response(404, json={})


def _requests_counted(provider: str) -> float:
    total = 0.0
    for family in REGISTRY.collect():
        if family.name == "keyrotor_provider_requests":
            total += sum(s.value for s in family.samples if s.name.endswith("_total") and s.labels["provider"] == provider)
    return total


def test_a_rotation_counts_each_provider_request_once(sqlite_url: str) -> None:
    world = World(url=sqlite_url, provider=FakeProvider(name="acme")).build()
    api = ProviderApi()
    assert world.old is not None
    api.keys[world.old.key_id] = {"id": world.old.key_id, "name": "initial", "secret": world.old.secret, "valid": True}
    http = build_provider(HttpProviderSpec.model_validate(SPEC), name="acme", resolve=lambda ref: Secret("admin-token-1"),
                          limiter=InMemoryRateLimiter(), http=httpx.Client(transport=httpx.MockTransport(api)), attempts=1)
    world.provider = http  # type: ignore[assignment]  # the context's factory hands out world.provider
    before = _requests_counted("acme")
    assert world.drive(world.request()) == RunState.completed
    assert api.requests >= 4  # list, issue, checks, revoke
    assert _requests_counted("acme") - before == api.requests


def test_a_scheduler_that_loses_the_lock_drops_its_leader_only_gauges(sqlite_url: str, redis_client,  # type: ignore[no-untyped-def]
                                                                       redis_namespace: str) -> None:
    from jobs.scheduler import KeyrotorScheduler, SchedulerConfig
    from worker.db.session import make_engine

    lock = f"{redis_namespace}:scheduler:leader"
    sched = KeyrotorScheduler(make_engine(sqlite_url), redis_client, SchedulerConfig(lock_ttl_s=30, lock_name=lock))
    sched._lock_tick()
    assert sched.lock.is_leader and REGISTRY.get_sample_value("keyrotor_scheduler_leader") == 1
    metrics.scheduler_metrics().set_backlog([("acme", 3)], [("issued", 2)])  # what a detection pass exports
    assert REGISTRY.get_sample_value("keyrotor_keys_due", {"provider": "acme"}) == 3
    redis_client.set(lock, "another-scheduler", px=30_000)  # a failover: someone else holds the lock now
    sched._lock_tick()
    assert not sched.lock.is_leader
    assert REGISTRY.get_sample_value("keyrotor_scheduler_leader") == 0
    assert REGISTRY.get_sample_value("keyrotor_keys_due", {"provider": "acme"}) is None
    assert REGISTRY.get_sample_value("keyrotor_open_runs", {"state": "issued"}) is None


def test_healthz_lists_what_stops_the_worker() -> None:
    from worker.cli.common import redis_reachable
    from worker.runtime.workers import worker_problems

    assert metrics.health() == (200, b"ok")
    # Two processes expected, none started by this one; the broker URL points at a closed port.
    metrics.set_health_check(lambda: worker_problems(2, lambda: redis_reachable("redis://127.0.0.1:1/0", timeout=0.5)))
    try:
        status, body = metrics.health()
    finally:
        metrics.set_health_check(None)
    assert status == 503
    assert body.decode().splitlines() == ["2 of 2 worker processes are not running",
                                          "the broker (Redis, KEYROTOR_REDIS_URL) does not answer"]


def test_healthz_is_ok_with_the_broker_answering(redis_url: str) -> None:
    from worker.cli.common import redis_reachable
    from worker.runtime.workers import worker_problems

    assert worker_problems(1, lambda: redis_reachable(redis_url)) == []


def test_a_failing_health_check_is_unhealthy() -> None:
    def check() -> list[str]:
        raise RuntimeError("boom")

    metrics.set_health_check(check)
    try:
        assert metrics.health() == (503, b"health check failed: RuntimeError\n")
    finally:
        metrics.set_health_check(None)
