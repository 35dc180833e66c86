"""The exception vocabulary shared by every adapter.

Steps decide what to do from the *class* of an error, never from its text: transient errors are
retried with backoff (honouring ``retry_after``), permanent ones are not. Messages must never
contain a secret value.
"""

from __future__ import annotations


class KeyrotorError(Exception):
    """Base class for every error keyrotor raises on purpose."""


class ConfigError(KeyrotorError):
    """Bad settings or inventory: the message names what is wrong and what is expected."""


class TransientError(KeyrotorError):
    """Worth retrying later: timeouts, connection errors, 5xx, rate limits."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimited(TransientError):
    """429 (or equivalent); ``retry_after`` holds the server's Retry-After in seconds, if any."""


class PermanentError(KeyrotorError):
    """Retrying will not help (4xx other than 429, malformed answers, refused requests)."""


class InvalidCredential(PermanentError):
    """The provider rejected the credential (401/403 style)."""


class DeprecatedCredential(PermanentError):
    """The provider rejected the credential because its type is deprecated (e.g. Asana's 434)."""


class GarbageResponse(TransientError):
    """The peer answered something that does not parse; often a proxy hiccup, so retried."""


class StateConflict(KeyrotorError):
    """A conditional state change matched no row: another worker already moved the run."""


def is_permanent(exc: BaseException) -> bool:
    """Retrying cannot help: a ``PermanentError``, or a ``ConfigError`` (a missing secret reference,
    an invalid stored spec) that only a change of configuration fixes."""
    return isinstance(exc, (PermanentError, ConfigError))
