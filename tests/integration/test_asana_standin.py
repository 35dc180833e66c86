"""The Asana stand-in behaves like the vendor documents (000: API key deprecation timeline and
amnesty header; 001: personal access tokens made by a person, limits by plan, search, errors)."""

from __future__ import annotations

from base64 import b64encode
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Iterator

import httpx
import pytest

from keyrotor_sandbox.asana import AsanaHandle, PersonOnly, start_asana_in_thread

pytestmark = pytest.mark.integration


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def asana(clock: Clock) -> Iterator[AsanaHandle]:
    handle = start_asana_in_thread(plan="free", today=at("2015-09-01"), monotonic=clock)
    yield handle
    handle.stop()


def me(asana: AsanaHandle, token: str | None, **headers: str) -> httpx.Response:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.get(f"{asana.url}/api/1.0/users/me", headers=headers, timeout=5)


def test_api_key_timeline_amnesty_header_and_434(asana: AsanaHandle) -> None:
    key = asana.state.generate_api_key("alice")
    basic = "Basic " + b64encode(f"{key.token}:".encode()).decode()
    assert me(asana, key.token).status_code == 200
    assert httpx.get(f"{asana.url}/api/1.0/users/me", headers={"Authorization": basic}, timeout=5).status_code == 200
    asana.set_today(at("2016-01-02"))            # no new keys, existing ones still work
    with pytest.raises(PersonOnly):
        asana.state.generate_api_key("bob")
    assert me(asana, key.token).status_code == 200
    asana.set_today(at("2017-01-15"))            # the amnesty header is needed
    refused = me(asana, key.token)
    assert refused.status_code == 434 and "Asana-Amnesty-Api-Key" in refused.json()["errors"][0]["message"]
    assert me(asana, key.token, **{"Asana-Amnesty-Api-Key": "true"}).status_code == 200
    control = {"Authorization": f"Bearer {asana.control_token}"}   # "today" over HTTP, as in the control API
    assert httpx.post(f"{asana.url}/_sandbox/today", json={"today": "2017-02-01T00:00:00Z"}, headers=control,
                      timeout=5).status_code == 204                # amnesty is over
    assert me(asana, key.token, **{"Asana-Amnesty-Api-Key": "true"}).status_code == 434
    pat = asana.state.create_pat("alice", "automation")
    assert me(asana, pat.token).status_code == 200   # PATs are unaffected


def test_personal_access_tokens_only_a_person_creates_and_revokes(asana: AsanaHandle) -> None:
    with pytest.raises(PersonOnly):
        asana.state.create_pat("alice", " ")          # a description is required
    first = asana.state.create_pat("alice", "ci")
    second = asana.state.create_pat("alice", "reports")
    assert me(asana, first.token).json()["data"]["name"] == "alice"
    # No API route creates or revokes one: the API answers 404 to anything of the sort.
    for method, path in (("POST", "/api/1.0/personal_access_tokens"), ("DELETE", f"/api/1.0/personal_access_tokens/{first.gid}")):
        assert httpx.request(method, asana.url + path, headers={"Authorization": f"Bearer {first.token}"}, timeout=5).status_code == 404
    # The UI (control routes) revokes them one by one.
    ui = {"Authorization": f"Bearer {asana.control_token}"}
    assert httpx.post(f"{asana.url}/_sandbox/ui/pat/revoke", json={"gid": first.gid}, headers=ui, timeout=5).status_code == 204
    assert me(asana, first.token).status_code == 401
    assert me(asana, second.token).status_code == 200
    made = httpx.post(f"{asana.url}/_sandbox/ui/pat", json={"user": "bob", "name": "x"}, headers=ui, timeout=5).json()
    assert me(asana, made["token"]).status_code == 200
    assert httpx.post(f"{asana.url}/_sandbox/ui/pat", json={"user": "bob", "name": "x"}, timeout=5).status_code == 401


def test_documented_errors(asana: AsanaHandle) -> None:
    pat = asana.state.create_pat("alice", "t")
    auth = {"Authorization": f"Bearer {pat.token}"}
    assert me(asana, None).status_code == 401
    assert me(asana, "1/nonsense:token").status_code == 401
    assert httpx.get(f"{asana.url}/api/1.0/tasks/123", headers=auth, timeout=5).status_code == 404
    assert httpx.get(f"{asana.url}/api/1.0/nowhere", headers=auth, timeout=5).status_code == 404
    assert httpx.post(f"{asana.url}/api/1.0/tasks", json={"data": {"name": "x"}}, headers=auth, timeout=5).status_code == 400
    search = f"{asana.url}/api/1.0/workspaces/1/tasks/search"
    payment = httpx.get(search, params={"text": "x"}, headers=auth, timeout=5)
    assert payment.status_code == 402 and "premium" in payment.json()["errors"][0]["message"]
    asana.state.plan = "paid"
    assert httpx.get(search, headers=auth, timeout=5).status_code == 400
    assert httpx.get(search, params={"text": "x"}, headers=auth, timeout=5).status_code == 200


@pytest.mark.parametrize("plan, limit", [("free", 150), ("paid", 1500)])
def test_requests_a_minute_by_plan(asana: AsanaHandle, clock: Clock, plan: str, limit: int) -> None:
    asana.state.plan = plan
    pat = asana.state.create_pat("alice", "t")
    with httpx.Client(headers={"Authorization": f"Bearer {pat.token}"}, timeout=5) as client:
        statuses = [client.get(f"{asana.url}/api/1.0/users/me").status_code for _ in range(limit)]
        assert set(statuses) == {200}
        clock.now += 30
        over = client.get(f"{asana.url}/api/1.0/users/me")
        assert over.status_code == 429 and over.headers["Retry-After"] == "30"
        clock.now += 30.5                                    # a minute after the first ones
        assert client.get(f"{asana.url}/api/1.0/users/me").status_code == 200
    other = asana.state.create_pat("bob", "t")               # limits are per user
    assert me(asana, other.token).status_code == 200


def test_search_has_its_own_limit_of_60_a_minute(asana: AsanaHandle, clock: Clock) -> None:
    asana.state.plan = "paid"
    pat = asana.state.create_pat("alice", "t")
    with httpx.Client(headers={"Authorization": f"Bearer {pat.token}"}, timeout=5) as client:
        search = f"{asana.url}/api/1.0/workspaces/1/tasks/search"
        assert {client.get(search, params={"text": "x"}).status_code for _ in range(60)} == {200}
        assert client.get(search, params={"text": "x"}).status_code == 429
        assert client.get(f"{asana.url}/api/1.0/users/me").status_code == 200   # other endpoints go on
        clock.now += 61
        assert client.get(search, params={"text": "x"}).status_code == 200


def test_concurrency_limit_depends_on_the_method() -> None:
    asana = start_asana_in_thread(plan="paid", slow=1.5)
    try:
        pat = asana.state.create_pat("alice", "t")
        auth = {"Authorization": f"Bearer {pat.token}"}

        def write(_: int) -> int:
            return httpx.post(f"{asana.url}/api/1.0/tasks", json={"data": {"workspace": "1"}}, headers=auth, timeout=10).status_code

        with ThreadPoolExecutor(40) as pool:
            statuses = list(pool.map(write, range(40)))
        assert asana.state.peak["alice:write"] == 15          # never more than 15 writes at once
        assert statuses.count(429) >= 1 and set(statuses) == {201, 429}
        assert asana.state.peak["alice:read"] == 0
    finally:
        asana.stop()
