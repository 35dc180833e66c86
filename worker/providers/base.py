"""The provider plugin interface: what a rotation step may ask of a provider.

Failures raise ``RateLimited`` (429, honour ``retry_after``), ``TransientError`` /
``GarbageResponse`` (timeouts, 5xx, unparsable answers) or ``PermanentError`` (other 4xx).
``check`` answers ``invalid`` / ``deprecated`` instead of raising for 401/403 and the provider's
configured deprecation codes (e.g. Asana's 434).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Callable, Protocol, runtime_checkable

from worker.protocol.states import Mode
from worker.secret import Secret
from worker.errors import TransientError


class CheckOutcome(str, Enum):
    valid = "valid"
    invalid = "invalid"
    deprecated = "deprecated"


class RevokeOutcome(str, Enum):
    """What the provider answered to a revocation: audit trails report this, not an assumption."""

    revoked = "revoked"            # the provider confirmed it revoked the key now
    already_gone = "already_gone"  # the provider answered that the key does not exist (404)


def revoke_outcome(answer: object) -> RevokeOutcome:
    """A ``revoke`` result as a ``RevokeOutcome`` (adapters that return nothing confirmed it)."""
    return answer if isinstance(answer, RevokeOutcome) else RevokeOutcome(str(getattr(answer, "value", answer) or "revoked"))


@dataclass(frozen=True)
class IssuedCredential:
    secret: Secret
    key_id: str | None
    name: str
    expires_at: datetime | None


@dataclass(frozen=True)
class ProviderKeyInfo:
    key_id: str | None
    name: str | None
    created_at: datetime | None = None
    extra: dict[str, str] = field(default_factory=dict)
    #: ``False`` when the list says the key is revoked/inactive, ``None`` when it does not say.
    live: bool | None = None
    #: The part of the key the list shows (``"sk_…4f2a"``), when it shows one; never the key.
    hint: str | None = None


@runtime_checkable
class Provider(Protocol):
    name: str
    mode: Mode
    can_issue: bool
    can_revoke: bool
    can_list: bool

    def issue(self, *, name: str, credential_type: str, labels: dict[str, str]) -> IssuedCredential: ...

    def check(self, secret: Secret, *, credential_type: str) -> CheckOutcome: ...

    def revoke(self, *, key_id: str | None, secret: Secret | None, credential_type: str) -> RevokeOutcome: ...

    def list_keys(self) -> list[ProviderKeyInfo]: ...


def issued_name(run_id: str) -> str:
    """The name every credential keyrotor issues carries, so an orphan can always be traced."""
    return f"keyrotor-{run_id}"


def wait_until_live(
    provider: Provider,
    secret: Secret,
    credential_type: str,
    *,
    timeout: float,
    poll_interval: float,
    sleep: Callable[[float], None],
    monotonic: Callable[[], float],
) -> CheckOutcome:
    """Poll ``check`` until the credential is valid or ``timeout`` seconds have passed.

    Providers activate new keys with a delay, so ``invalid`` before the deadline means "not yet".
    Returns the last outcome (``valid``, or ``invalid``/``deprecated`` at the deadline).
    ``deprecated`` ends the wait at once: waiting will not make a deprecated type acceptable.
    Transient errors (5xx, 429, timeouts) count as "not yet" while time remains; the last one is
    re-raised if the deadline passes with no definite answer.
    """
    deadline = monotonic() + timeout
    while True:
        error: TransientError | None = None
        outcome = CheckOutcome.invalid
        try:
            outcome = provider.check(secret, credential_type=credential_type)
        except TransientError as exc:
            error = exc
        if error is None and outcome is not CheckOutcome.invalid:
            return outcome  # valid, or deprecated (waiting will not help)
        remaining = deadline - monotonic()
        if remaining <= 0:
            if error is not None:
                raise error
            return outcome
        wait = poll_interval
        if error is not None and error.retry_after:
            wait = max(wait, error.retry_after)
        sleep(min(wait, remaining))
