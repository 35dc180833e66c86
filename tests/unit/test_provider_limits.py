"""Endpoint groups and concurrency limits: which buckets a request counts against, the in-memory
concurrency lease, and the inventory's validation (FILE:LINE)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from worker.errors import RateLimited
from worker.inventory.loader import InventoryError, load_inventory
from worker.inventory.schema import HttpProviderSpec
from worker.providers.limits import ProviderLimits
from worker.providers.ratelimit import InMemoryRateLimiter
from keyrotor_sandbox.asana import asana_provider_spec


def spec(**changes: object) -> HttpProviderSpec:
    data = asana_provider_spec("https://app.asana.example")
    data.update(changes)
    return HttpProviderSpec.model_validate(data)


def test_requests_count_against_the_provider_and_each_matching_group() -> None:
    limits = ProviderLimits("asana", spec(), InMemoryRateLimiter(), lease_s=30)
    base = "https://app.asana.example/api/1.0"
    assert limits.buckets("GET", f"{base}/users/me") == ["asana"]
    assert limits.buckets("GET", f"{base}/workspaces/123/tasks/search") == ["asana", "asana/search"]
    assert limits.buckets("GET", f"{base}/workspaces/123/tasks/search/") == ["asana", "asana/search"]
    assert limits.buckets("GET", f"{base}/workspaces/1/2/tasks/search") == ["asana"]   # * is one segment
    assert limits.buckets("post", f"{base}/tasks") == ["asana", "asana/writes"]
    deep = ProviderLimits("p", spec(endpoint_groups={"all": {"paths": ["/api/**"], "concurrency": 2}}),
                          InMemoryRateLimiter(), lease_s=30)
    assert deep.buckets("GET", f"{base}/a/b/c") == ["p", "p/all"] and deep.buckets("GET", "https://x/other") == ["p"]


def test_a_group_rate_limit_is_its_own_budget() -> None:
    limiter = InMemoryRateLimiter(max_wait=0)
    limits = ProviderLimits("asana", spec(endpoint_groups={"search": {"paths": ["/s"], "rate_limit": {"requests": 2, "per": "60s"}}}),
                            limiter, lease_s=30)
    limits.acquire("GET", "https://h/s")
    limits.acquire("GET", "https://h/s")
    with pytest.raises(RateLimited):
        limits.acquire("GET", "https://h/s")
    limits.acquire("GET", "https://h/users/me")     # the provider's own budget (150/min) is not spent


def test_concurrency_lease_is_bounded_and_released() -> None:
    limiter = InMemoryRateLimiter(max_wait=0.2)
    limits = ProviderLimits("asana", spec(concurrency=2, endpoint_groups={}), limiter, lease_s=30)
    entered = threading.Barrier(3)
    release = threading.Event()

    def hold() -> None:
        with limits.in_flight("GET", "https://h/x"):
            entered.wait(5)
            release.wait(5)

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for t in threads:
        t.start()
    entered.wait(5)
    assert limiter.in_flight("asana") == 2
    with pytest.raises(RateLimited) as caught:
        with limits.in_flight("GET", "https://h/x"):
            pass
    assert "concurrency limit" in str(caught.value) and caught.value.retry_after == 1.0
    release.set()
    for t in threads:
        t.join(5)
    assert limiter.in_flight("asana") == 0
    with limits.in_flight("GET", "https://h/x"):
        assert limiter.in_flight("asana") == 1


BAD = """\
version: 1
providers:
  asana:
    kind: http
    mode: assisted
    base_url: https://app.asana.example
    concurrency: 10
    endpoint_groups:
      search:
        paths: ["api/search?x=1"]
        rate_limit: {requests: 60, per: 60s}
      writes:
        methods: [POST]
        concurrency: 15
      empty:
        paths: [/x]
    credential_types: {personal_access_token: {}}
    calls:
      verify: {method: GET, url: "{base_url}/users/me", auth: {type: bearer, token: "{secret}"}}
"""


def test_config_check_reports_endpoint_group_problems_at_their_lines(tmp_path: Path) -> None:
    path = tmp_path / "inv.yaml"
    path.write_text(BAD)
    with pytest.raises(InventoryError) as caught:
        load_inventory(path)
    lines = [p.format() for p in caught.value.problems]
    text = "\n".join(lines)
    assert f"{path}:10: providers.asana.endpoint_groups.search.paths" in text and "starting with /" in text
    assert f"{path}:15: providers.asana.endpoint_groups.empty" in text and "give rate_limit, concurrency or both" in text
    # Once the groups themselves are well-formed, a group that could never be reached is shown too.
    path.write_text(BAD.replace('"api/search?x=1"', "/api/search").replace("      empty:\n        paths: [/x]\n", ""))
    with pytest.raises(InventoryError) as caught:
        load_inventory(path)
    text = "\n".join(p.format() for p in caught.value.problems)
    assert f"{path}:14: providers.asana.endpoint_groups.writes.concurrency" in text and "more than the provider's concurrency (10)" in text
