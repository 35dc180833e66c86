"""When a newly issued (or deposited) credential expires, when the provider's answer does not say.

The key's next due date is its expiry minus the lead time; an unknown expiry falls back to
``max_age``, which for a key that expires monthly is an outage. So the expiry of a new version is,
in this order:

1. what the provider answered (``calls.issue.response.expires_at``);
2. the issue time plus the credential type's declared ``lifetime`` (Workfront: ``30d``);
3. the issue time plus the lifetime the version being replaced had (its expiry minus its issue
   time, or the key's expiry minus its last rotation): a known expiry is carried forward as a
   lifetime, never dropped;
4. otherwise unknown (``None``), with a warning naming the fix (declare ``lifetime``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Optional

from sqlmodel import col, select, Session

from worker import log
from worker.clock import as_utc
from worker.db.models import KeyVersion, ManagedKey, ProviderRecord, VersionStage
from worker.inventory.credential_facts import declared_lifetime

logger = log.get_logger("keyrotor.pipeline")


@dataclass(frozen=True)
class Expiry:
    at: Optional[datetime]
    basis: str  # provider | lifetime | previous_lifetime | unknown


def previous_lifetime(session: Session, key: ManagedKey, current: Optional[KeyVersion] = None) -> Optional[timedelta]:
    """How long the credential in use now was meant to live, when both ends are known.
    ``current``: its version, when the caller has it at hand (no query)."""
    current = current if current is not None else session.exec(
        select(KeyVersion).where(KeyVersion.key_id == key.id, KeyVersion.stage == VersionStage.current.value)
        .order_by(col(KeyVersion.id).desc())
    ).first()
    pairs: list[tuple[Any, Any]] = []
    if current is not None:
        pairs.append((current.issued_at, current.expires_at))
    pairs.append((key.last_rotated_at, key.expires_at))
    for start, end in pairs:
        start, end = as_utc(start), as_utc(end)
        if start is not None and end is not None and end > start:
            return end - start
    return None


def new_version_expiry(session: Session, key: ManagedKey, credential_type: str, issued_at: datetime,
                       answered: Optional[datetime], current: Optional[KeyVersion] = None) -> Expiry:
    """The expiry to record for a version of ``key`` issued at ``issued_at`` (see the module doc)."""
    if answered is not None:
        return Expiry(answered, "provider")
    lifetime = declared_lifetime(session.get(ProviderRecord, key.provider), credential_type)
    if lifetime is not None:
        return Expiry(issued_at + lifetime, "lifetime")
    lifetime = previous_lifetime(session, key, current)
    if lifetime is not None:
        logger.warning("expiry.estimated", basis="previous_lifetime", lifetime_s=int(lifetime.total_seconds()),
                       hint=f"declare 'lifetime' on credential type {credential_type!r} of provider {key.provider!r}")
        return Expiry(issued_at + lifetime, "previous_lifetime")
    if key.expires_at is not None:
        logger.warning("expiry.unknown", credential_type=credential_type, provider=key.provider,
                       hint="the provider's answer carries no expiry and none can be derived: declare 'lifetime' on "
                            "the credential type (the key's next due date falls back to max_age)")
    return Expiry(None, "unknown")


__all__ = ["Expiry", "new_version_expiry", "previous_lifetime"]
