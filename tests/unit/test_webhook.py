"""Webhook signing and the webhook integration's requests and response classes (httpx MockTransport)."""

from __future__ import annotations

import json
from typing import Any, Callable

import httpx
import pytest

from worker.errors import GarbageResponse, PermanentError, RateLimited, TransientError
from worker.integrations.base import Announcement, VerifyStatus
from worker.integrations.registry import build_integration
from worker.integrations.signing import SignatureError, compute, parse, sign, verify
from worker.integrations.webhook import WebhookIntegration
from worker.inventory.schema import WebhookIntegrationSpec
from worker.secret import Secret

SIGNING = Secret("whsec-unit-test-0123456789")
NOW = 1_800_000_000


def announcement(secret: str = "sk_live_new_key_value_123") -> Announcement:
    value = Secret(secret)
    return Announcement(event="rotated", key_name="alloy/reporting", run_id="run42", provider_key_id="k-9",
                        fingerprint=value.fingerprint, vault_mount="secret", vault_path="apps/reporting/alloy",
                        vault_version=3, secret=value)


# --------------------------------------------------------------------------- signing
def test_signature_round_trip_and_format() -> None:
    body = b'{"a":1}'
    header = sign(SIGNING, body, timestamp=NOW)
    assert header == f"t={NOW},v1={compute(SIGNING, NOW, body)}"
    assert verify(SIGNING, body, header, now=NOW + 10) == NOW
    # the documented construction: HMAC-SHA256(secret, "<t>.<raw body>")
    import hashlib
    import hmac

    assert compute(SIGNING, NOW, body) == hmac.new(SIGNING.reveal().encode(), f"{NOW}.".encode() + body, hashlib.sha256).hexdigest()


@pytest.mark.parametrize("mutate", [
    lambda b, h: (b + b" ", h),                                     # tampered body
    lambda b, h: (b, h.replace("v1=", "v1=00")),                    # tampered signature
    lambda b, h: (b, sign("another-secret", b, timestamp=NOW)),     # wrong signing secret
    lambda b, h: (b, None),                                         # missing header
    lambda b, h: (b, "v1=abc"),                                     # no timestamp
    lambda b, h: (b, f"t=soon,v1={compute(SIGNING, NOW, b)}"),      # garbage timestamp
    lambda b, h: (b, f"t={NOW},v1=caf\u00e9"),                      # non-ASCII signature (was a TypeError)
])
def test_bad_signatures_are_rejected(mutate: Callable[[bytes, str], tuple[bytes, Any]]) -> None:
    body = b'{"event":"rotated"}'
    new_body, header = mutate(body, sign(SIGNING, body, timestamp=NOW))
    with pytest.raises(SignatureError):
        verify(SIGNING, new_body, header, now=NOW)


def test_stale_and_future_timestamps_are_rejected() -> None:
    body = b"{}"
    header = sign(SIGNING, body, timestamp=NOW)
    assert verify(SIGNING, body, header, now=NOW + 300) == NOW
    with pytest.raises(SignatureError, match="replayed"):
        verify(SIGNING, body, header, now=NOW + 301)
    with pytest.raises(SignatureError):
        verify(SIGNING, body, header, now=NOW - 301)


def test_multiple_v1_signatures_accepted_during_secret_rollover() -> None:
    body = b"{}"
    header = f"t={NOW},v1={compute('old-secret', NOW, body)},v1={compute(SIGNING, NOW, body)}"
    assert parse(header)[0] == NOW
    assert verify(SIGNING, body, header, now=NOW) == NOW


# --------------------------------------------------------------------------- the integration
def make(handler: Callable[[httpx.Request], httpx.Response], **spec: Any) -> tuple[WebhookIntegration, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request)
        return handler(request)

    data = {"kind": "webhook", "url": "https://hooks.example/keyrotor?token=abc", "signing_secret": {"env": "SIGN"}, **spec}
    integration = build_integration(WebhookIntegrationSpec.model_validate(data), name="reporting", vault=None,
                                    resolve=lambda ref: SIGNING, http=httpx.Client(transport=httpx.MockTransport(record)),
                                    sleep=lambda s: None, now=lambda: NOW)
    assert isinstance(integration, WebhookIntegration)
    return integration, seen


def test_push_sends_signed_announcement_without_secret() -> None:
    integration, seen = make(lambda r: httpx.Response(204))
    ann = announcement()
    integration.push(ann)
    (request,) = seen
    body = request.content
    assert verify(SIGNING, body, request.headers["X-Keyrotor-Signature"], now=NOW) == NOW
    assert request.headers["X-Keyrotor-Event"] == "rotated"
    payload = json.loads(body)
    assert payload == {"event": "rotated", "key": "alloy/reporting", "run_id": "run42", "provider_key_id": "k-9",
                       "fingerprint": ann.fingerprint,
                       "vault": {"mount": "secret", "path": "apps/reporting/alloy", "field": "api_key", "version": 3}}
    assert ann.secret.reveal().encode() not in body


def test_push_includes_secret_only_when_asked() -> None:
    integration, seen = make(lambda r: httpx.Response(200), include_secret=True)
    integration.push(announcement())
    assert json.loads(seen[0].content)["secret"] == "sk_live_new_key_value_123"


@pytest.mark.parametrize("status,error", [(500, TransientError), (503, TransientError), (429, RateLimited),
                                          (401, PermanentError), (400, PermanentError)])
def test_push_response_classes(status: int, error: type[Exception]) -> None:
    integration, seen = make(lambda r: httpx.Response(status, headers={"Retry-After": "3"}))
    with pytest.raises(error) as caught:
        integration.push(announcement())
    if issubclass(error, TransientError):
        assert len(seen) == 3 and getattr(caught.value, "retry_after") == 3  # bounded retries
    else:
        assert len(seen) == 1
        assert not isinstance(caught.value, TransientError)
    assert "token=abc" not in str(caught.value)  # query strings (can hold secrets) never in messages


def test_push_recovers_after_transient_failure() -> None:
    answers = iter([httpx.Response(502), httpx.Response(200)])
    integration, seen = make(lambda r: next(answers))
    integration.push(announcement())
    assert len(seen) == 2


def test_verify_compares_reported_fingerprint() -> None:
    ann = announcement()
    integration, _ = make(lambda r: httpx.Response(200, json={"ok": True, "fingerprint": ann.fingerprint}),
                          health_url="https://hooks.example/health")
    assert integration.verify(ann).status is VerifyStatus.ok

    integration, _ = make(lambda r: httpx.Response(200, json={"ok": True, "fingerprint": "sha256:0000"}),
                          health_url="https://hooks.example/health")
    result = integration.verify(ann)
    assert result.status is VerifyStatus.mismatch and result.reported_fingerprint == "sha256:0000"

    integration, _ = make(lambda r: httpx.Response(200, json={"ok": False, "fingerprint": ann.fingerprint}),
                          health_url="https://hooks.example/health")
    assert integration.verify(ann).status is VerifyStatus.mismatch

    integration, _ = make(lambda r: httpx.Response(200, text="<html>"), health_url="https://hooks.example/health")
    with pytest.raises(GarbageResponse):
        integration.verify(ann)


def test_verify_without_health_url_is_unchecked() -> None:
    integration, seen = make(lambda r: httpx.Response(200))
    assert integration.verify(announcement()).status is VerifyStatus.unchecked
    assert seen == []
