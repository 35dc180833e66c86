"""The integration plugin interface: how a new secret reaches the systems that depend on it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol, runtime_checkable

from worker.secret import Secret

EVENTS = ("rotated", "rolled_back")


@dataclass(frozen=True)
class Announcement:
    """What an integration is told about a key's new current version."""

    event: str  # "rotated" | "rolled_back"
    key_name: str
    run_id: str
    provider_key_id: str | None
    fingerprint: str
    vault_mount: str
    vault_path: str
    vault_version: int
    secret: Secret
    vault_field: str = "api_key"

    def __post_init__(self) -> None:
        if self.event not in EVENTS:
            raise ValueError(f"announcement event must be one of {', '.join(EVENTS)}, not {self.event!r}")

    def public(self) -> dict[str, Any]:
        """The announcement without the secret (what a webhook body carries by default)."""
        return {
            "event": self.event,
            "key": self.key_name,
            "run_id": self.run_id,
            "provider_key_id": self.provider_key_id,
            "fingerprint": self.fingerprint,
            "vault": {"mount": self.vault_mount, "path": self.vault_path, "field": self.vault_field,
                      "version": self.vault_version},
        }


class VerifyStatus(str, Enum):
    ok = "ok"  # the sink reports (or holds) the announced fingerprint
    mismatch = "mismatch"  # it reports another one
    unchecked = "unchecked"  # it has no way to tell (no health URL)
    pending = "pending"  # it holds the key but is still taking it up (a rollout): ask again later


@dataclass(frozen=True)
class VerifyResult:
    status: VerifyStatus
    reported_fingerprint: str | None = None
    detail: str | None = None
    retry_in_s: float | None = None  # pending: when to ask again

    @property
    def ok(self) -> bool:
        return self.status is VerifyStatus.ok


@runtime_checkable
class Integration(Protocol):
    name: str

    def push(self, announcement: Announcement) -> None: ...

    def verify(self, announcement: Announcement) -> VerifyResult: ...
