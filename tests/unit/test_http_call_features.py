"""The generic HTTP provider's declared call features on a mock transport. Error matchers: each
outcome maps to the error class the steps act on; the call's matchers come before the provider's;
unmatched answers keep the status rules. Requests before a call: a token request feeding it."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from worker.errors import (
    ConfigError,
    DeprecatedCredential,
    InvalidCredential,
    PermanentError,
    RateLimited,
    TransientError,
)
from worker.inventory.schema import HttpProviderSpec
from worker.providers.base import CheckOutcome
from worker.providers.http import HttpProvider
from worker.providers.ratelimit import InMemoryRateLimiter
from worker.secret import Secret


def provider(answer: httpx.Response, *, errors: list[dict[str, Any]], call_errors: list[dict[str, Any]] | None = None,
             seen: list[httpx.Request] | None = None) -> HttpProvider:
    spec = HttpProviderSpec.model_validate({
        "kind": "http", "mode": "overlap", "base_url": "https://api.example",
        "auth": {"type": "bearer", "token": {"env": "ADMIN"}},
        "errors": errors,
        "credential_types": {"t": {}},
        "calls": {
            "issue": {"method": "POST", "url": "{base_url}/keys", "response": {"secret": "$.key"},
                      "errors": call_errors or []},
            "verify": {"method": "GET", "url": "{base_url}/me", "auth": {"type": "bearer", "token": "{secret}"}},
            "revoke": {"method": "DELETE", "url": "{base_url}/keys/{key_id}"},
        },
    })

    def handler(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        return answer

    return HttpProvider("p", spec, resolve=lambda _ref: Secret("admin-token-123456"),
                        limiter=InMemoryRateLimiter(max_wait=0), http=httpx.Client(transport=httpx.MockTransport(handler)),
                        attempts=3, sleep=lambda _s: None)


def issue(p: HttpProvider) -> Any:
    return p.issue(name="keyrotor-r", credential_type="t", labels={})


@pytest.mark.parametrize("outcome,error", [
    ("configuration", ConfigError), ("permanent", PermanentError), ("invalid", InvalidCredential),
    ("deprecated", DeprecatedCredential), ("transient", TransientError), ("rate_limited", RateLimited),
])
def test_each_outcome_raises_its_class(outcome: str, error: type[Exception]) -> None:
    answer = httpx.Response(503, json={"fault": {"text": "Maintenance until 10:00"}}, headers={"Retry-After": "7"})
    with pytest.raises(error) as caught:
        issue(provider(answer, errors=[{"status": [502, 503], "body_contains": "Maintenance", "outcome": outcome,
                                        "message": "$.fault.text", "hint": "wait for the vendor"}]))
    assert "Maintenance until 10:00" in str(caught.value) and "wait for the vendor" in str(caught.value)
    if outcome in ("transient", "rate_limited"):
        assert caught.value.retry_after == 7  # type: ignore[attr-defined]


def test_success_outcome_accepts_the_answer() -> None:
    answer = httpx.Response(409, json={"key": "new-key-abcdef", "note": "already there"})
    issued = issue(provider(answer, errors=[{"status": 409, "outcome": "success"}]))
    assert issued.secret.reveal() == "new-key-abcdef"


def test_the_calls_matchers_come_first() -> None:
    answer = httpx.Response(500, json={"error": "Untrusted request"})
    with pytest.raises(ConfigError):
        issue(provider(answer, errors=[{"status": 500, "outcome": "transient"}],
                       call_errors=[{"status": 500, "body_contains": "Untrusted", "outcome": "configuration"}]))


def test_an_unmatched_answer_keeps_the_status_rules() -> None:
    seen: list[httpx.Request] = []
    answer = httpx.Response(500, json={"error": "boom"})
    p = provider(answer, errors=[{"status": 500, "body_contains": "Untrusted", "outcome": "configuration"}], seen=seen)
    with pytest.raises(TransientError):
        p.check(Secret("k-1234567890"), credential_type="t")
    assert len(seen) == 3  # retried as before


def test_a_configuration_answer_is_not_retried_and_check_does_not_call_it_invalid() -> None:
    seen: list[httpx.Request] = []
    answer = httpx.Response(500, json={"error": "Untrusted request"})
    p = provider(answer, errors=[{"status": 500, "body_contains": "Untrusted", "outcome": "configuration"}], seen=seen)
    with pytest.raises(ConfigError):
        p.check(Secret("k-1234567890"), credential_type="t")
    assert len(seen) == 1


def test_a_matched_invalid_answer_is_invalid_on_check() -> None:
    answer = httpx.Response(200, json={"status": "error", "reason": "key revoked"})
    p = provider(answer, errors=[{"status": 200, "body_contains": "key revoked", "outcome": "invalid"}])
    assert p.check(Secret("k-1234567890"), credential_type="t") is CheckOutcome.invalid


def test_the_message_is_scrubbed_and_cut() -> None:
    long = "x" * 500
    answer = httpx.Response(400, json={"error": {"message": f"token admin-token-123456 refused {long}"}})
    with pytest.raises(PermanentError) as caught:
        issue(provider(answer, errors=[{"status": 400, "outcome": "permanent", "message": "$.error.message"}]))
    text = str(caught.value)
    assert "admin-token-123456" not in text and "[REDACTED]" in text and "x" * 301 not in text


def test_a_token_request_feeds_the_api_call() -> None:
    """The other common chain: an OAuth 2.0 client-credentials token request (client secret from a
    reference, in the form body) whose access token authorises the call itself."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/oauth/token":
            return httpx.Response(200, json={"access_token": "at-5e6f7a8b9c0d", "token_type": "Bearer"})
        return httpx.Response(201, json={"key": "new-key-abcdef"})

    spec = HttpProviderSpec.model_validate({
        "kind": "http", "mode": "cutover", "base_url": "https://api.example",
        "credential_types": {"t": {}},
        "calls": {
            "issue": {
                "before": [{"name": "token", "method": "POST", "url": "{base_url}/oauth/token",
                            "form": {"grant_type": "client_credentials", "client_id": "keyrotor",
                                     "client_secret": {"env": "CLIENT_SECRET"}},
                            "capture": {"access_token": "$.access_token"}}],
                "method": "POST", "url": "{base_url}/keys",
                "headers": {"Authorization": "Bearer {captured[access_token]}"},
                "response": {"secret": "$.key"}},
            "verify": {"method": "GET", "url": "{base_url}/me", "auth": {"type": "bearer", "token": "{secret}"}},
        },
    })
    p = HttpProvider("p", spec, resolve=lambda _ref: Secret("cs-1a2b3c4d5e6f"), limiter=InMemoryRateLimiter(max_wait=0),
                     http=httpx.Client(transport=httpx.MockTransport(handler)), sleep=lambda _s: None)
    assert issue(p).secret.reveal() == "new-key-abcdef"
    token, call = seen
    assert dict(httpx.QueryParams(token.content.decode())) == {
        "grant_type": "client_credentials", "client_id": "keyrotor", "client_secret": "cs-1a2b3c4d5e6f"}
    assert call.headers["Authorization"] == "Bearer at-5e6f7a8b9c0d"
