"""Deprecation: a provider answering "this credential type is deprecated" (Asana's 434) for a
key's current credential triggers an immediate rotation to the type's replacement.

Scheduled rotations before a cutoff come from the due time (``worker/service/due.py``); this is the
safety net for when the provider moves first or the schedule was missed. The idempotency key
is per key, deprecated type and hour: every call made with a dead credential answers 434, and
all of them join the same run; if that run fails (and alerted), at most one new one per hour.
"""

from __future__ import annotations

from typing import Any

from sqlmodel import Session, select

from worker.pipeline.outbox import enqueue_after_commit
from worker.service.hooks import Pipeline, default_pipeline
from worker.clock import utcnow
from worker.db.models import ManagedKey, ProviderRecord, RotationRun
from worker.log import get_logger

log = get_logger(__name__)


def replacement_type(record: ProviderRecord | None, credential_type: str) -> str | None:
    """The credential type a deprecated ``credential_type`` migrates to, per the provider's policy."""
    if record is None:
        return None
    types: Any = (record.spec or {}).get("credential_types") or {}
    spec = types.get(credential_type) if isinstance(types, dict) else None
    replacement = spec.get("replacement") if isinstance(spec, dict) else None
    return replacement if isinstance(replacement, str) and replacement else None


def on_deprecated_response(
    session: Session,
    *,
    key_name: str,
    credential_type: str,
    requested_by: str = "provider:deprecated-response",
    pipeline: Pipeline | None = None,
) -> RotationRun | None:
    """Request an immediate rotation of ``key_name`` to the replacement type (joins an open run).

    Returns None when the answer is stale: the key already moved to another credential type.
    The run is enqueued when ``session`` commits.
    """
    key = session.exec(select(ManagedKey).where(ManagedKey.name == key_name)).first()
    if key is None:
        log.warning("deprecated_response_unknown_key", key=key_name, credential_type=credential_type)
        return None
    if key.credential_type != credential_type:
        log.info("deprecated_response_stale", key=key_name, credential_type=credential_type, current_type=key.credential_type)
        return None
    target = replacement_type(session.get(ProviderRecord, key.provider), credential_type)
    now = utcnow()
    pipeline = pipeline or default_pipeline()
    run, created = pipeline.request_rotation(
        session,
        key_name=key_name,
        reason="deprecation",
        trigger="deprecation",
        requested_by=requested_by,
        idempotency_key=f"deprecated:{key.id}:{credential_type}:{now:%Y%m%d%H}",
        target_credential_type=target,
    )
    if created:
        enqueue_after_commit(session, run, pipeline.enqueue_run)
    log.warning("deprecated_credential_rotation", key=key_name, credential_type=credential_type,
                replacement=target, run_id=run.id, created=created)
    return run
