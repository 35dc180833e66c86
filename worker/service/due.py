"""When a key is next due for rotation, and why.

``next_due_at`` is the earliest of:
- ``expiry``: the credential's expiry minus the key's expiry lead time;
- ``max_age``: the last rotation (or, for a key never rotated, its creation) plus the maximum age;
- ``deprecation``: the first cutoff of the key's credential type (the start of its amnesty or
  rejected phase) minus the lead time. A cutoff already in the past still counts — a credential
  of that type is overdue until it has been rotated to the replacement type.

The value is stored in one indexed column so the detection scan costs O(keys due). It is
recomputed by ``config apply``, after a run completes, and whenever a key changes.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Literal, Mapping, Optional, cast

from sqlmodel import Session

from worker.clock import as_utc, utcnow
from worker.db.models import ManagedKey, ProviderRecord
from worker.inventory.provider_parts import CredentialTypeSpec

DueReason = Literal["expiry", "max_age", "deprecation"]


def compute_next_due(
    key: ManagedKey, credential_type: Optional[CredentialTypeSpec], now: datetime
) -> tuple[datetime | None, DueReason | None]:
    """The key's next due time and its reason; ``(None, None)`` when nothing makes it due.

    Pure: reads only ``key`` and ``credential_type``. ``now`` stands in for the creation time of
    a key not yet saved (its age starts now). A disabled key is never due.
    """
    if not key.enabled:
        return None, None
    lead = timedelta(seconds=key.expiry_lead_time_s or 0)
    candidates: list[tuple[datetime, DueReason]] = []

    expires_at = as_utc(key.expires_at)
    if expires_at is not None:
        candidates.append((expires_at - lead, "expiry"))

    if key.max_age_s:
        aged_from = as_utc(key.last_rotated_at) or as_utc(key.created_at) or as_utc(now)
        assert aged_from is not None
        candidates.append((aged_from + timedelta(seconds=key.max_age_s), "max_age"))

    if credential_type is not None:
        cutoff = credential_type.first_cutoff()
        if cutoff is not None:
            candidates.append((as_utc(cutoff) - lead, "deprecation"))

    if not candidates:
        return None, None
    # Earliest wins; on a tie the order above (expiry, max_age, deprecation) names the reason.
    due_at, reason = min(candidates, key=lambda c: c[0])
    return due_at, reason


def credential_type_from_spec(provider_spec: dict[str, Any] | None, credential_type: str) -> CredentialTypeSpec | None:
    """The credential type's spec from a provider record's stored spec JSON, if declared there."""
    if not isinstance(provider_spec, dict):
        return None
    types = provider_spec.get("credential_types")
    raw = types.get(credential_type) if isinstance(types, dict) else None
    if raw is None:
        return None
    return CredentialTypeSpec.model_validate(raw)


class _KeyChanged:
    """A key as it will be once ``changes`` are made to it (read-only, for ``compute_next_due``)."""

    def __init__(self, key: ManagedKey, changes: Mapping[str, Any]) -> None:
        self._key, self._changes = key, changes

    def __getattr__(self, name: str) -> Any:
        return self._changes[name] if name in self._changes else getattr(self._key, name)


def next_due_after(key: ManagedKey, changes: Mapping[str, Any], provider_spec: dict[str, Any] | None,
                   now: datetime) -> dict[str, Any]:
    """``next_due_at`` and ``due_reason`` of ``key`` once ``changes`` are made to it, for an UPDATE
    that sets them all at once (a run's ``finish``). ``provider_spec``: its provider record's spec
    as applied."""
    changed = cast(ManagedKey, _KeyChanged(key, changes))
    due_at, reason = compute_next_due(changed, credential_type_from_spec(provider_spec, changed.credential_type), now)
    return {"next_due_at": due_at, "due_reason": reason}


def refresh_next_due(session: Session, key: ManagedKey, now: datetime | None = None) -> bool:
    """Recompute ``key.next_due_at``/``due_reason`` in the session (not committed).

    Returns True when either value changed. The credential type's deprecation comes from the
    provider record as applied from the inventory.
    """
    now = now or utcnow()
    record = session.get(ProviderRecord, key.provider)
    credential_type = credential_type_from_spec(record.spec if record else None, key.credential_type)
    due_at, reason = compute_next_due(key, credential_type, now)
    if as_utc(key.next_due_at) == due_at and key.due_reason == reason:
        return False
    key.next_due_at = due_at
    key.due_reason = reason
    session.add(key)
    return True
