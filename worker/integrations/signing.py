"""Webhook signatures (docs/internals.md "Webhook signatures").

``X-Keyrotor-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>``; a
receiver recomputes the HMAC over the raw bytes it received and rejects signatures older than
300 s (replays) or from too far in the future (clock skew beyond the same tolerance).

``WebhookVerifier`` is the receiver side in one call: signature, freshness, and replays (the
signature and the ``X-Keyrotor-Delivery`` id of each accepted delivery are remembered, in bounded
caches). Integrators: docs/webhooks.md.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections import OrderedDict
from typing import Callable, Mapping, Optional

from worker.secret import Secret

SIGNATURE_HEADER = "X-Keyrotor-Signature"
EVENT_HEADER = "X-Keyrotor-Event"
DELIVERY_HEADER = "X-Keyrotor-Delivery"
TOLERANCE_S = 300


class SignatureError(ValueError):
    """The signature is missing, malformed, stale or does not match the body."""


class ReplayedDelivery(SignatureError):
    """A correctly signed delivery this receiver already accepted (same signature or delivery id)."""


def _key(secret: Secret | str) -> bytes:
    return (secret.reveal() if isinstance(secret, Secret) else secret).encode("utf-8")


def compute(secret: Secret | str, timestamp: int, body: bytes) -> str:
    return hmac.new(_key(secret), str(timestamp).encode("ascii") + b"." + body, hashlib.sha256).hexdigest()


def sign(secret: Secret | str, body: bytes, *, timestamp: int | None = None) -> str:
    """The header value for ``body``."""
    ts = int(time.time()) if timestamp is None else int(timestamp)
    return f"t={ts},v1={compute(secret, ts, body)}"


def parse(header: str | None) -> tuple[int, list[str]]:
    """(timestamp, v1 signatures) from a header value; ``SignatureError`` if malformed."""
    if not header:
        raise SignatureError(f"missing {SIGNATURE_HEADER} header")
    timestamp: int | None = None
    signatures: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t":
            try:
                timestamp = int(value)
            except ValueError:
                raise SignatureError("signature timestamp is not an integer") from None
        elif name == "v1" and value:
            signatures.append(value.strip().lower())
    if timestamp is None or not signatures:
        raise SignatureError(f"malformed {SIGNATURE_HEADER}: expected t=<unix seconds>,v1=<hex hmac>")
    return timestamp, signatures


def verify(secret: Secret | str, body: bytes, header: str | None, *, now: float | None = None,
           tolerance: int = TOLERANCE_S) -> int:
    """Check ``header`` against ``body``; returns the signed timestamp or raises ``SignatureError``."""
    timestamp, signatures = parse(header)
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise SignatureError(f"signature timestamp is {int(current - timestamp)} s away from now (limit {tolerance} s): replayed or clock skew")
    expected = compute(secret, timestamp, body)
    # Bytes, not str: compare_digest raises TypeError on a non-ASCII str (a garbage header
    # must be a SignatureError, not a crash of the receiver).
    wanted = expected.encode("ascii")
    if not any(hmac.compare_digest(wanted, candidate.encode("utf-8", "surrogateescape")) for candidate in signatures):
        raise SignatureError("signature does not match the body (wrong signing secret or altered body)")
    return timestamp


class _BoundedSet:
    """Remembers at most ``capacity`` items, each for ``ttl_s`` seconds (oldest forgotten first)."""

    def __init__(self, capacity: int, ttl_s: float) -> None:
        self._items: OrderedDict[str, float] = OrderedDict()
        self._capacity = capacity
        self._ttl_s = ttl_s

    def __contains__(self, item: str) -> bool:
        return item in self._items

    def expire(self, now: float) -> None:
        while self._items and next(iter(self._items.values())) <= now - self._ttl_s:
            self._items.popitem(last=False)

    def add(self, item: str, now: float) -> None:
        self._items[item] = now
        self._items.move_to_end(item)
        while len(self._items) > self._capacity:
            self._items.popitem(last=False)

    def discard(self, item: str) -> None:
        self._items.pop(item, None)


class WebhookVerifier:
    """Checks one incoming keyrotor delivery: signed with the shared secret, signed within
    ``tolerance`` seconds of now, and not seen before. Returns the signed timestamp or raises
    ``SignatureError`` (``ReplayedDelivery`` for a repeat), whose message names what is wrong and
    never holds the secret. Thread-safe.

    Replays are caught two ways: the signature of every accepted delivery is remembered while it
    is fresh (a byte-for-byte replay, whatever its unsigned headers say), and so is its delivery id
    (``X-Keyrotor-Delivery``), for ``delivery_ttl_s``, at most ``max_remembered`` of each; the
    oldest are forgotten first. keyrotor re-sends a delivery whose answer it did not get, with a
    fresh signature and the same id: answer a ``ReplayedDelivery`` with 2xx without acting again,
    and call ``forget`` for a delivery you accepted but could not act on (then answer 5xx).
    """

    def __init__(self, secret: Secret | str, *, tolerance: int = TOLERANCE_S, max_remembered: int = 10_000,
                 delivery_ttl_s: float = 86_400.0, clock: Optional[Callable[[], float]] = None) -> None:
        self._secret = secret
        self._tolerance = tolerance
        self._clock = clock or time.time
        self._signatures = _BoundedSet(max_remembered, 2 * tolerance)
        self._deliveries = _BoundedSet(max_remembered, delivery_ttl_s)
        self._lock = threading.Lock()

    def verify(self, body: bytes, headers: Mapping[str, str]) -> int:
        """Check a delivery given its raw body and its headers (any capitalisation)."""
        lowered = {k.lower(): v for k, v in headers.items()}
        signature = lowered.get(SIGNATURE_HEADER.lower())
        delivery = lowered.get(DELIVERY_HEADER.lower())
        now = float(self._clock())
        timestamp = verify(self._secret, body, signature, now=now, tolerance=self._tolerance)
        assert signature is not None  # verify() refuses a missing header
        with self._lock:
            self._signatures.expire(now)
            self._deliveries.expire(now)
            if signature in self._signatures:
                raise ReplayedDelivery("this signed delivery was already accepted: a replay")
            if delivery and delivery in self._deliveries:
                raise ReplayedDelivery(f"delivery {delivery[:120]!r} was already accepted: a replay or a re-delivery")
            self._signatures.add(signature, now)
            if delivery:
                self._deliveries.add(delivery, now)
        return timestamp

    def forget(self, headers: Mapping[str, str]) -> None:
        """Un-remember a delivery the receiver could not act on (it answers 5xx and keyrotor sends
        it again), so that the re-delivery is accepted."""
        lowered = {k.lower(): v for k, v in headers.items()}
        with self._lock:
            for cache, item in ((self._signatures, lowered.get(SIGNATURE_HEADER.lower())),
                                (self._deliveries, lowered.get(DELIVERY_HEADER.lower()))):
                if item:
                    cache.discard(item)
