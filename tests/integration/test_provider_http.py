"""The generic HTTP provider against the provider stand-in over real HTTP: every response class,
activation polling, deprecation phases (amnesty header, no new credentials), cutover, logging."""

from __future__ import annotations

import io
import json
import socket
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any, Iterator

import pytest

from worker.clock import set_clock
from worker.errors import (
    DeprecatedCredential,
    GarbageResponse,
    InvalidCredential,
    PermanentError,
    RateLimited,
    TransientError,
)
from worker.inventory.schema import HttpProviderSpec
from worker.providers.base import CheckOutcome
from worker.providers.http import HttpProvider
from worker.providers.ratelimit import InMemoryRateLimiter
from worker.providers.registry import build_provider
from keyrotor_sandbox.provider import ProviderHandle, standin_provider_spec, start_provider_in_thread
from worker.secret import Secret

pytestmark = pytest.mark.integration


class FakeTime:
    """One clock for the stand-in (activation, expiry) and the provider's polling: sleeping advances it."""

    def __init__(self) -> None:
        self.now = time.time()
        self.slept: list[float] = []

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def standin(fake_time: FakeTime) -> Iterator[ProviderHandle]:
    handle = start_provider_in_thread(clock=fake_time.time)
    yield handle
    handle.stop()


def make_provider(handle: ProviderHandle, fake_time: FakeTime, *, attempts: int = 1, timeout: float = 5.0,
                  limiter: Any = None, spec_overrides: dict[str, Any] | None = None, **spec_kwargs: Any) -> HttpProvider:
    data = standin_provider_spec(handle.url, admin_token_ref={"env": "SANDBOX_ADMIN"}, **spec_kwargs)
    for dotted, value in (spec_overrides or {}).items():
        target = data
        *parents, last = dotted.split(".")
        for part in parents:
            target = target[part]
        target[last] = value
    spec = HttpProviderSpec.model_validate(data)

    def resolve(ref: Any) -> Secret:
        assert ref.env == "SANDBOX_ADMIN"
        return Secret(handle.admin_token)

    provider = build_provider(spec, name="standin", resolve=resolve, limiter=limiter or InMemoryRateLimiter(max_wait=0),
                              attempts=attempts, timeout=timeout, sleep=fake_time.sleep, monotonic=fake_time.time)
    assert isinstance(provider, HttpProvider)
    return provider


# --------------------------------------------------------------------------- happy path
def test_issue_check_list_revoke_round_trip(standin: ProviderHandle, fake_time: FakeTime) -> None:
    provider = make_provider(standin, fake_time)
    issued = provider.issue(name="keyrotor-run123", credential_type="api_key", labels={})

    assert issued.name == "keyrotor-run123"
    assert issued.key_id and standin.key(issued.key_id).name == "keyrotor-run123"
    assert standin.is_live(issued.secret.reveal())
    assert provider.check(issued.secret, credential_type="api_key") is CheckOutcome.valid

    listed = {k.key_id: k for k in provider.list_keys()}
    assert listed[issued.key_id].name == "keyrotor-run123"
    assert listed[issued.key_id].created_at is not None

    provider.revoke(key_id=issued.key_id, secret=None, credential_type="api_key")
    assert provider.check(issued.secret, credential_type="api_key") is CheckOutcome.invalid
    provider.revoke(key_id=issued.key_id, secret=None, credential_type="api_key")  # 404: already gone, no error
    assert standin.stats()["routes"]["revoke"] == {"204": 1, "404": 1}


def test_list_never_carries_secrets(standin: ProviderHandle, fake_time: FakeTime) -> None:
    provider = make_provider(standin, fake_time)
    issued = provider.issue(name="keyrotor-a", credential_type="api_key", labels={})
    import httpx

    body = httpx.get(f"{standin.url}/api/api-key", headers={"Authorization": f"Bearer {standin.admin_token}"}).text
    assert issued.key_id in body and issued.secret.reveal() not in body


def test_issued_expiry_is_parsed(fake_time: FakeTime) -> None:
    handle = start_provider_in_thread(clock=fake_time.time, key_ttl=3600)
    try:
        issued = make_provider(handle, fake_time).issue(name="keyrotor-e", credential_type="api_key", labels={})
        expected = datetime.fromtimestamp(fake_time.now + 3600, tz=timezone.utc)
        assert issued.expires_at is not None and abs((issued.expires_at - expected).total_seconds()) < 1
        fake_time.now += 3601  # the stand-in's keys expire like Workfront's monthly keys
        assert make_provider(handle, fake_time).check(issued.secret, credential_type="api_key") is CheckOutcome.invalid
    finally:
        handle.stop()


# --------------------------------------------------------------------------- activation
def test_wait_until_live_polls_through_activation_delay(standin: ProviderHandle, fake_time: FakeTime) -> None:
    standin.configure(activation_delay=5)
    provider = make_provider(standin, fake_time)
    issued = provider.issue(name="keyrotor-act", credential_type="api_key", labels={})
    assert provider.check(issued.secret, credential_type="api_key") is CheckOutcome.invalid

    outcome = provider.wait_until_live(issued.secret, "api_key", timeout=30, poll_interval=2)
    assert outcome is CheckOutcome.valid
    assert fake_time.slept == [2, 2, 2]  # live after 5 s: polled at 0, 2, 4, 6
    assert standin.stats()["routes"]["check"] == {"401": 4, "200": 1}


def test_wait_until_live_gives_up_at_deadline(standin: ProviderHandle, fake_time: FakeTime) -> None:
    standin.configure(activation_delay=60)
    provider = make_provider(standin, fake_time)
    issued = provider.issue(name="keyrotor-slow", credential_type="api_key", labels={})
    assert provider.wait_until_live(issued.secret, "api_key", timeout=5, poll_interval=2) is CheckOutcome.invalid
    assert sum(fake_time.slept) == pytest.approx(5)


def test_wait_until_live_rides_out_transient_errors(standin: ProviderHandle, fake_time: FakeTime) -> None:
    provider = make_provider(standin, fake_time)
    issued = provider.issue(name="keyrotor-t", credential_type="api_key", labels={})
    standin.add_fault("check", status=503, count=2)
    assert provider.wait_until_live(issued.secret, "api_key", timeout=10, poll_interval=1) is CheckOutcome.valid


# --------------------------------------------------------------------------- response classes
def test_401_and_403(standin: ProviderHandle, fake_time: FakeTime) -> None:
    provider = make_provider(standin, fake_time)
    assert provider.check(Secret("not-a-key-at-all"), credential_type="api_key") is CheckOutcome.invalid
    standin.add_fault("list", status=403)
    with pytest.raises(InvalidCredential):
        provider.list_keys()


def test_429_with_retry_after_seconds_blocks_everyone(standin: ProviderHandle, fake_time: FakeTime) -> None:
    limiter = InMemoryRateLimiter(max_wait=0, now=fake_time.time, sleep=fake_time.sleep)
    provider = make_provider(standin, fake_time, limiter=limiter)
    standin.add_fault("issue", status=429, retry_after=7)
    with pytest.raises(RateLimited) as caught:
        provider.issue(name="keyrotor-rl", credential_type="api_key", labels={})
    assert caught.value.retry_after == 7
    assert limiter.blocked_for("standin") == pytest.approx(7)
    with pytest.raises(RateLimited):  # the next call does not even reach the provider
        provider.list_keys()
    assert standin.stats()["routes"] == {"issue": {"429": 1}}


def test_429_with_retry_after_http_date(standin: ProviderHandle, fake_time: FakeTime) -> None:
    now = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
    set_clock(lambda: now)
    standin.add_fault("check", status=429, retry_after=format_datetime(now + timedelta(seconds=42), usegmt=True))
    with pytest.raises(RateLimited) as caught:
        make_provider(standin, fake_time).check(Secret("whatever-key"), credential_type="api_key")
    assert caught.value.retry_after == pytest.approx(42)


def test_stand_in_rate_limit_answers_429(fake_time: FakeTime) -> None:
    handle = start_provider_in_thread(clock=fake_time.time, rate_limit=(2, 10))
    try:
        provider = make_provider(handle, fake_time)
        provider.list_keys()
        provider.list_keys()
        with pytest.raises(RateLimited) as caught:
            provider.list_keys()
        assert caught.value.retry_after == 10
    finally:
        handle.stop()


def test_5xx_is_transient_and_retried_with_backoff(standin: ProviderHandle, fake_time: FakeTime) -> None:
    standin.add_fault("list", status=500)
    with pytest.raises(TransientError) as caught:
        make_provider(standin, fake_time, attempts=1).list_keys()
    assert not isinstance(caught.value, PermanentError)

    standin.add_fault("list", status=502, count=2)
    assert make_provider(standin, fake_time, attempts=3).list_keys() == []
    assert standin.stats()["routes"]["list"] == {"500": 1, "502": 2, "200": 1}
    assert len(fake_time.slept) == 2


def test_issue_is_not_retried_blindly(standin: ProviderHandle, fake_time: FakeTime) -> None:
    standin.add_fault("issue", status=500)
    with pytest.raises(TransientError):
        make_provider(standin, fake_time, attempts=3).issue(name="keyrotor-x", credential_type="api_key", labels={})
    assert standin.stats()["routes"]["issue"] == {"500": 1}


def test_garbage_body_is_garbage_response(standin: ProviderHandle, fake_time: FakeTime) -> None:
    provider = make_provider(standin, fake_time)
    standin.add_fault("issue", garbage=True)
    with pytest.raises(GarbageResponse):
        provider.issue(name="keyrotor-g", credential_type="api_key", labels={})
    key = standin.seed_key()
    standin.add_fault("check", garbage=True)  # a 200 HTML page must not count as "valid"
    with pytest.raises(GarbageResponse):
        provider.check(Secret(key.secret), credential_type="api_key")


def test_missing_json_path_is_garbage_response(standin: ProviderHandle, fake_time: FakeTime) -> None:
    provider = make_provider(standin, fake_time, spec_overrides={"calls.issue.response": {"secret": "$.data.apiKey"}})
    with pytest.raises(GarbageResponse, match=r"\$\.data\.apiKey"):
        provider.issue(name="keyrotor-p", credential_type="api_key", labels={})


def test_timeout_is_transient(standin: ProviderHandle, fake_time: FakeTime) -> None:
    standin.add_fault("check", delay=5.0)
    started = time.monotonic()
    with pytest.raises(TransientError, match="timed out"):
        make_provider(standin, fake_time, timeout=0.2).check(Secret("k" * 20), credential_type="api_key")
    # The client gave up before the stand-in answered (not a speed target: a correctness bound,
    # generous so a loaded machine cannot fail it).
    assert time.monotonic() - started < 5.0


def test_connection_refused_is_transient(fake_time: FakeTime) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spec = HttpProviderSpec.model_validate(standin_provider_spec(f"http://127.0.0.1:{port}", admin_token_ref={"env": "X"}))
    provider = HttpProvider("gone", spec, resolve=lambda ref: Secret("admin-token"), limiter=InMemoryRateLimiter(), attempts=1)
    with pytest.raises(TransientError):
        provider.list_keys()


def test_other_4xx_is_permanent(standin: ProviderHandle, fake_time: FakeTime) -> None:
    provider = make_provider(standin, fake_time, spec_overrides={"calls.issue.body": {"label": "{key_name}"}})
    with pytest.raises(PermanentError) as caught:  # the stand-in answers 400: 'name' is required
        provider.issue(name="keyrotor-b", credential_type="api_key", labels={})
    assert not isinstance(caught.value, InvalidCredential)
    assert standin.stats()["routes"]["issue"] == {"400": 1}


# --------------------------------------------------------------------------- deprecation (Asana's timeline)
ASANA_TYPES = {
    "api_key": {
        "replacement": "personal_access_token",
        "deprecation": [
            {"phase": "no_new_credentials", "from": "2016-01-01T00:00:00Z"},
            {"phase": "amnesty", "from": "2017-01-01T00:00:00Z", "headers": {"Asana-Amnesty-Api-Key": True}},
            {"phase": "rejected", "from": "2017-02-01T00:00:00Z"},
        ],
    },
    "personal_access_token": {},
}


def _at(day: str) -> None:
    when = datetime.fromisoformat(day).replace(tzinfo=timezone.utc)
    set_clock(lambda: when)


def test_amnesty_header_is_sent_only_in_its_phase(standin: ProviderHandle, fake_time: FakeTime) -> None:
    key = standin.seed_key("legacy", credential_type="api_key")
    standin.set_deprecation("api_key", "amnesty")  # the provider wants the header
    provider = make_provider(standin, fake_time, credential_types=ASANA_TYPES)

    _at("2016-06-01")  # no amnesty phase yet in our inventory: no header, so 434
    assert provider.check(Secret(key.secret), credential_type="api_key") is CheckOutcome.deprecated
    _at("2017-01-15")  # amnesty phase: the header is added and the call is served
    assert provider.check(Secret(key.secret), credential_type="api_key") is CheckOutcome.valid
    _at("2017-03-01")  # rejected phase: no more header
    assert provider.check(Secret(key.secret), credential_type="api_key") is CheckOutcome.deprecated
    assert standin.stats()["routes"]["check"] == {"434": 2, "200": 1}


def test_rejected_type_is_deprecated_on_check_and_raises_elsewhere(standin: ProviderHandle, fake_time: FakeTime) -> None:
    key = standin.seed_key("legacy", credential_type="api_key")
    standin.set_deprecation("api_key", "rejected")
    provider = make_provider(standin, fake_time)
    assert provider.check(Secret(key.secret), credential_type="api_key") is CheckOutcome.deprecated
    standin.add_fault("revoke", status=434)
    with pytest.raises(DeprecatedCredential):
        provider.revoke(key_id=key.id, secret=None, credential_type="api_key")


def test_no_new_credentials_phase_refuses_issue_naming_replacement(standin: ProviderHandle, fake_time: FakeTime) -> None:
    provider = make_provider(standin, fake_time, credential_types=ASANA_TYPES)
    _at("2016-06-01")
    with pytest.raises(PermanentError, match="personal_access_token"):
        provider.issue(name="keyrotor-n", credential_type="api_key", labels={})
    assert "issue" not in standin.stats()["routes"]  # refused before any request
    issued = provider.issue(name="keyrotor-n", credential_type="personal_access_token", labels={})
    assert standin.key(issued.key_id or "").credential_type == "personal_access_token"


# --------------------------------------------------------------------------- cutover (Workfront's reset)
def test_cutover_standin_invalidates_previous_key(fake_time: FakeTime) -> None:
    handle = start_provider_in_thread(clock=fake_time.time, cutover=True)
    try:
        old = handle.seed_key("current", owner="docs-sync")
        spec_overrides = {"calls.issue.body": {"name": "{key_name}", "username": "{labels[user]}"}}
        provider = make_provider(handle, fake_time, mode="cutover", spec_overrides=spec_overrides)
        new = provider.issue(name="keyrotor-c", credential_type="api_key", labels={"user": "docs-sync"})
        assert provider.check(new.secret, credential_type="api_key") is CheckOutcome.valid
        assert provider.check(Secret(old.secret), credential_type="api_key") is CheckOutcome.invalid
    finally:
        handle.stop()


# --------------------------------------------------------------------------- no secret in logs
def test_no_secret_reaches_the_logs(standin: ProviderHandle, fake_time: FakeTime) -> None:
    from worker.log import configure_logging

    stream = io.StringIO()
    configure_logging("DEBUG", "json", stream=stream)
    try:
        provider = make_provider(standin, fake_time)
        issued = provider.issue(name="keyrotor-log", credential_type="api_key", labels={})
        provider.check(issued.secret, credential_type="api_key")
        standin.add_fault("check", status=500)
        with pytest.raises(TransientError) as caught:
            provider.check(issued.secret, credential_type="api_key")
        provider.revoke(key_id=issued.key_id, secret=issued.secret, credential_type="api_key")
    finally:
        configure_logging("INFO", "json")
    output = stream.getvalue()
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]
    assert any(line.get("event") == "provider_request" and line.get("status") == 201 for line in lines)
    for value in (issued.secret.reveal(), standin.admin_token):
        assert value not in output
        assert value not in str(caught.value)
