"""A webhook receiver built on keyrotor's signing helpers (``WebhookVerifier``) rejects unsigned,
wrongly signed, altered, stale and replayed deliveries, and remembers a bounded number of them.
The consumer stand-in is such a receiver."""

from __future__ import annotations

import json
from typing import Any

import pytest

from worker.integrations.signing import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    ReplayedDelivery,
    SignatureError,
    WebhookVerifier,
    sign,
)
from keyrotor_sandbox.consumer import Consumer, ConsumerConfig
from keyrotor_sandbox.standin_http import Request

SECRET = "whsec_test_0123456789abcdef"
BODY = b'{"event":"rotated","fingerprint":"sha256:ab","vault":{"mount":"secret","path":"apps/x"}}'
NOW = 1_800_000_000


class Clock:
    def __init__(self) -> None:
        self.now = float(NOW)

    def __call__(self) -> float:
        return self.now


def headers(body: bytes = BODY, *, secret: str = SECRET, at: int = NOW, delivery: str | None = "run1:rotated:2") -> dict[str, str]:
    out = {SIGNATURE_HEADER: sign(secret, body, timestamp=at)}
    if delivery is not None:
        out[DELIVERY_HEADER] = delivery
    return out


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def verifier(clock: Clock) -> WebhookVerifier:
    return WebhookVerifier(SECRET, clock=clock)


def test_accepts_a_correctly_signed_fresh_delivery(verifier: WebhookVerifier) -> None:
    assert verifier.verify(BODY, headers()) == NOW


def test_header_names_are_case_insensitive(verifier: WebhookVerifier) -> None:
    assert verifier.verify(BODY, {k.lower(): v for k, v in headers().items()}) == NOW


@pytest.mark.parametrize("bad_headers, reason", [
    ({}, "missing"),
    ({DELIVERY_HEADER: "run1:rotated:2"}, "missing"),
    ({SIGNATURE_HEADER: ""}, "missing"),
    ({SIGNATURE_HEADER: "v1=abc"}, "malformed"),
    ({SIGNATURE_HEADER: f"t={NOW}"}, "malformed"),
    ({SIGNATURE_HEADER: "t=soon,v1=abc"}, "not an integer"),
    ({SIGNATURE_HEADER: f"t={NOW},v1=\u00e9\u00e9"}, "does not match"),
])
def test_rejects_unsigned_and_malformed_deliveries(verifier: WebhookVerifier, bad_headers: dict[str, str], reason: str) -> None:
    with pytest.raises(SignatureError, match=reason):
        verifier.verify(BODY, bad_headers)


def test_rejects_a_delivery_signed_with_another_secret(verifier: WebhookVerifier) -> None:
    with pytest.raises(SignatureError, match="does not match") as caught:
        verifier.verify(BODY, headers(secret="whsec_someone_else_000000"))
    assert SECRET not in str(caught.value)


def test_rejects_an_altered_body(verifier: WebhookVerifier) -> None:
    with pytest.raises(SignatureError, match="does not match"):
        verifier.verify(BODY.replace(b"rotated", b"rolled_back"), headers())


@pytest.mark.parametrize("offset", [-301, 301, -86_400])
def test_rejects_a_stale_or_future_signature(verifier: WebhookVerifier, offset: int) -> None:
    with pytest.raises(SignatureError, match="away from now"):
        verifier.verify(BODY, headers(at=NOW + offset))


def test_accepts_a_signature_within_the_tolerance(verifier: WebhookVerifier) -> None:
    assert verifier.verify(BODY, headers(at=NOW - 299)) == NOW - 299


def test_rejects_a_byte_for_byte_replay(verifier: WebhookVerifier) -> None:
    first = headers()
    verifier.verify(BODY, first)
    with pytest.raises(ReplayedDelivery):
        verifier.verify(BODY, first)


def test_rejects_a_replay_whose_unsigned_delivery_id_was_changed(verifier: WebhookVerifier) -> None:
    """The delivery id header is not signed: an attacker can change it, not the signature."""
    verifier.verify(BODY, headers())
    for delivery in ("run1:rotated:3", None):
        with pytest.raises(ReplayedDelivery):
            verifier.verify(BODY, headers(delivery=delivery))


def test_rejects_a_re_signed_delivery_with_a_remembered_id(verifier: WebhookVerifier, clock: Clock) -> None:
    verifier.verify(BODY, headers())
    clock.now += 60
    with pytest.raises(ReplayedDelivery, match="run1:rotated:2"):
        verifier.verify(BODY, headers(at=NOW + 60))


def test_forget_lets_a_delivery_the_receiver_could_not_act_on_come_again(verifier: WebhookVerifier, clock: Clock) -> None:
    first = headers()
    verifier.verify(BODY, first)
    verifier.forget(first)
    clock.now += 30
    assert verifier.verify(BODY, headers(at=NOW + 30)) == NOW + 30


def test_the_replay_memory_is_bounded_oldest_first(clock: Clock) -> None:
    verifier = WebhookVerifier(SECRET, clock=clock, max_remembered=3)
    for n in range(4):
        verifier.verify(BODY, headers(at=NOW - n, delivery=f"run{n}:rotated:2"))
    clock.now += 1
    # run0 was pushed out by run3; run1..run3 are still remembered
    assert verifier.verify(BODY, headers(at=NOW + 1, delivery="run0:rotated:2")) == NOW + 1
    with pytest.raises(ReplayedDelivery):
        verifier.verify(BODY, headers(at=NOW + 1, delivery="run3:rotated:2"))


def test_delivery_ids_are_forgotten_after_their_ttl(clock: Clock) -> None:
    verifier = WebhookVerifier(SECRET, clock=clock, delivery_ttl_s=3600)
    verifier.verify(BODY, headers())
    clock.now += 3601
    assert verifier.verify(BODY, headers(at=int(clock.now))) == int(clock.now)


# --------------------------------------------------------------------------- the consumer stand-in
class _Consumer(Consumer):
    def __init__(self, config: ConsumerConfig) -> None:
        super().__init__(config)
        self.reloads = 0

    def reload(self) -> Any:  # no Vault here: the verifier is what is under test
        self.reloads += 1
        return "sha256:ab"


def _request(hdrs: dict[str, str], body: bytes = BODY) -> Request:
    return Request(method="POST", path="/hooks/keyrotor", query={}, headers={k.lower(): v for k, v in hdrs.items()}, body=body)


def test_the_consumer_stand_in_rejects_bad_deliveries_and_does_not_act_on_a_replay(clock: Clock) -> None:
    consumer = _Consumer(ConsumerConfig("http://127.0.0.1:1", "token", "secret", "apps/x", "api_key", "", SECRET, now=clock))
    try:
        assert consumer(_request({})).status == 401
        assert consumer(_request(headers(secret="whsec_wrong_000000000"))).status == 401
        assert consumer(_request(headers(at=NOW - 3600))).status == 401
        good = headers()
        assert consumer(_request(good)).status == 200
        replay = consumer(_request(good))
        assert replay.status == 200 and json.loads(replay.body)["replayed"] is True
        assert consumer.reloads == 1
        assert consumer.stats.webhooks_rejected == 3 and consumer.stats.webhooks_accepted == 1
    finally:
        consumer.stop()
