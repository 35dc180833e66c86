"""Webhook signatures (docs/internals.md "Webhook signatures").

``X-Keyrotor-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>``; a
receiver recomputes the HMAC over the raw bytes it received and rejects signatures older than
300 s (replays) or from too far in the future (clock skew beyond the same tolerance).
"""

from __future__ import annotations

import hashlib
import hmac
import time

from worker.secret import Secret

SIGNATURE_HEADER = "X-Keyrotor-Signature"
EVENT_HEADER = "X-Keyrotor-Event"
TOLERANCE_S = 300


class SignatureError(ValueError):
    """The signature is missing, malformed, stale or does not match the body."""


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
