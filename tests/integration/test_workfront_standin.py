"""The Workfront stand-in behaves as "Manage API keys" (seed 003) documents, over real HTTP:
per-user keys, generateApiKey with username and password, reset invalidates the old key, remove,
admin keys with admin rights, expiry after a configurable period (default a month) and on
password expiry, remove-all, and API login requiring an X.509 certificate."""

from __future__ import annotations

from typing import Iterator

import httpx
import pytest

from keyrotor_sandbox.workfront import DEFAULT_KEY_TTL_S, UNTRUSTED, WorkfrontHandle, start_workfront_in_thread

API = "/attask/api/v15.0"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def wf(clock: Clock) -> Iterator[WorkfrontHandle]:
    handle = start_workfront_in_thread(clock=clock)
    handle.add_user("alice@example.com", "alice-pw-1")
    handle.add_user("root@example.com", "root-pw-1", admin=True)
    try:
        yield handle
    finally:
        handle.stop()


def generate(wf: WorkfrontHandle, username: str, password: str, **extra: str) -> httpx.Response:
    return httpx.put(f"{wf.url}{API}/user/generateApiKey", data={"username": username, "password": password, **extra})


def session(wf: WorkfrontHandle, key: str) -> httpx.Response:
    return httpx.get(f"{wf.url}{API}/session", headers={"apiKey": key})


def test_generate_with_username_and_password_in_the_body_or_the_documented_query(wf: WorkfrontHandle) -> None:
    answer = generate(wf, "alice@example.com", "alice-pw-1")
    assert answer.status_code == 200
    key = answer.json()["data"]["result"]
    assert session(wf, key).json()["data"] == {"userID": wf.user("alice@example.com").id,
                                               "username": "alice@example.com", "isAdmin": False}
    # The documented browser form: everything in the query, method=PUT as a parameter.
    documented = httpx.get(f"{wf.url}/attask/api/v7.0/user", params={
        "action": "generateApiKey", "username": "alice@example.com", "password": "alice-pw-1", "method": "PUT"})
    assert documented.status_code == 200
    newer = documented.json()["data"]["result"]
    assert session(wf, newer).status_code == 200 and session(wf, key).status_code == 401


def test_wrong_password_is_401_and_makes_no_key(wf: WorkfrontHandle) -> None:
    answer = generate(wf, "alice@example.com", "nope")
    assert answer.status_code == 401 and "Invalid username or password" in answer.json()["error"]["message"]
    assert wf.user("alice@example.com").api_key is None


def test_reset_invalidates_the_old_key_at_once(wf: WorkfrontHandle) -> None:
    first = generate(wf, "alice@example.com", "alice-pw-1").json()["data"]["result"]
    second = generate(wf, "alice@example.com", "alice-pw-1").json()["data"]["result"]
    assert first != second
    assert session(wf, first).status_code == 401
    assert session(wf, second).status_code == 200


def test_remove_a_key(wf: WorkfrontHandle) -> None:
    key = generate(wf, "alice@example.com", "alice-pw-1").json()["data"]["result"]
    cleared = httpx.put(f"{wf.url}{API}/user/clearApiKey", data={"username": "alice@example.com", "password": "alice-pw-1"})
    assert cleared.status_code == 200
    assert session(wf, key).status_code == 401


def test_admin_keys_carry_admin_rights(wf: WorkfrontHandle) -> None:
    admin_key = generate(wf, "root@example.com", "root-pw-1").json()["data"]["result"]
    user_key = generate(wf, "alice@example.com", "alice-pw-1").json()["data"]["result"]
    assert session(wf, admin_key).json()["data"]["isAdmin"] is True
    everyone = httpx.get(f"{wf.url}{API}/user/search", headers={"apiKey": admin_key}).json()["data"]
    only_self = httpx.get(f"{wf.url}{API}/user/search", headers={"apiKey": user_key}).json()["data"]
    assert len(everyone) == 2 and [u["username"] for u in only_self] == ["alice@example.com"]


def test_keys_expire_after_a_month_by_default_and_after_the_configured_period(wf: WorkfrontHandle, clock: Clock) -> None:
    assert DEFAULT_KEY_TTL_S == 30 * 86400
    key = generate(wf, "alice@example.com", "alice-pw-1").json()["data"]["result"]
    clock.now += DEFAULT_KEY_TTL_S - 60
    assert session(wf, key).status_code == 200
    clock.now += 120
    assert session(wf, key).status_code == 401
    # A new period counts from the time it is changed, for keys made before too.
    key = generate(wf, "alice@example.com", "alice-pw-1").json()["data"]["result"]
    clock.now += 10 * 86400
    wf.configure(key_ttl=180 * 86400)
    clock.now += 170 * 86400
    assert session(wf, key).status_code == 200
    clock.now += 11 * 86400
    assert session(wf, key).status_code == 401


def test_expiry_on_password_expiry_only_when_configured(wf: WorkfrontHandle, clock: Clock) -> None:
    user = wf.user("alice@example.com")
    key = generate(wf, "alice@example.com", "alice-pw-1").json()["data"]["result"]
    user.password_expires_at = clock.now + 3600
    clock.now += 7200
    assert session(wf, key).status_code == 200      # default: not selected
    wf.configure(remove_on_password_expiry=True)
    assert session(wf, key).status_code == 401
    # An expired password cannot log in to make a new key either.
    answer = generate(wf, "alice@example.com", "alice-pw-1")
    assert answer.status_code == 401 and "expired" in answer.json()["error"]["message"]


def test_remove_all_api_keys(wf: WorkfrontHandle) -> None:
    keys = [generate(wf, u, p).json()["data"]["result"] for u, p in (("alice@example.com", "alice-pw-1"), ("root@example.com", "root-pw-1"))]
    assert wf.state.remove_all_api_keys() == 2
    assert all(session(wf, k).status_code == 401 for k in keys)


def test_login_requires_the_certificate_once_it_is_required(wf: WorkfrontHandle) -> None:
    login = f"{wf.url}{API}/login"
    creds = {"username": "alice@example.com", "password": "alice-pw-1"}
    before = httpx.post(login, data=creds)
    assert before.status_code == 200 and before.json()["data"]["sessionID"]
    wf.require_certificate("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----")
    refused = httpx.post(login, data=creds)
    assert refused.status_code == 500 and refused.json()["error"]["message"] == UNTRUSTED
    assert UNTRUSTED == "Untrusted request. Please contact your system administrator and attach certificate."
    # generateApiKey with username and password is a login too.
    assert generate(wf, **{"username": creds["username"], "password": creds["password"]}).status_code == 500
    accepted = httpx.post(login, data={**creds, "apiCertificate": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"})
    assert accepted.status_code == 200
    session_id = accepted.json()["data"]["sessionID"]
    # The session then makes the key, without the password.
    made = httpx.put(f"{wf.url}{API}/user/generateApiKey", headers={"sessionID": session_id})
    assert made.status_code == 200 and wf.is_live(made.json()["data"]["result"])


def test_rate_limit_answers_429_with_retry_after(wf: WorkfrontHandle) -> None:
    wf.configure(rate_limit=(2, 60.0))
    statuses = [httpx.get(f"{wf.url}{API}/session", headers={"apiKey": "x"}) for _ in range(3)]
    assert [s.status_code for s in statuses] == [401, 401, 429]
    assert int(statuses[-1].headers["Retry-After"]) >= 1
