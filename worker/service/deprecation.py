"""Deprecated credential types: what keyrotor does when a provider says a credential type is
deprecated (Asana's 434). The one home of the idea, for the steps and for the jobs alike.

Two situations (docs/internals.md, "Deprecation responses"):

- the key's *current* (old) credential is rejected as deprecated: the key moves to the type's
  replacement. ``on_deprecated_response`` requests a rotation to it (joining the key's open run,
  so it is idempotent and harmless while the run that noticed is still open); the liveness job
  calls it in its own transaction, a step through ``report_deprecated``, in a transaction of its
  own after the step's committed. The idempotency key is per key, deprecated type and hour: every
  call made with a dead credential answers 434 and all of them join the same run; if that run
  fails (and alerted), at most one new one per hour. Scheduled rotations before a cutoff come from
  the due time (``worker/service/due.py``); this is the safety net for when the provider moves
  first or the schedule was missed.
- the *new* credential is deprecated (the run issued, or tried to issue, a type the provider no
  longer accepts): retrying cannot help, so ``NewCredentialDeprecated`` (a ``PermanentError``)
  fails the run at once with a message naming the replacement type. When that type is also the
  key's current type, the run's clean-up step reports it once the run is over
  (``deprecated_failure_type``), so a run to the replacement follows (see ``steps/recovery.py``).
"""

from __future__ import annotations

from typing import Any, Optional

from sqlmodel import Session, select

from worker.clock import utcnow
from worker.db.models import AuditEvent, ManagedKey, ProviderRecord, RotationRun
from worker.db.session import session_scope
from worker.errors import PermanentError
from worker.log import get_logger
from worker.pipeline.outbox import enqueue_after_commit
from worker.protocol.states import RunState
from worker.service.hooks import Pipeline, default_pipeline

log = get_logger(__name__)

#: The audit detail field that marks a failure caused by a deprecated credential type.
DEPRECATED_TYPE_FIELD = "deprecated_type"


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


class NewCredentialDeprecated(PermanentError):
    """The provider rejects the credential type this run issues as deprecated."""

    def __init__(self, message: str, *, credential_type: str, replacement: Optional[str]) -> None:
        super().__init__(message)
        self.credential_type = credential_type
        self.replacement = replacement


def replacement_of(session: Session, provider: str, credential_type: str) -> Optional[str]:
    """The replacement the provider's policy names for ``credential_type`` (None if none)."""
    return replacement_type(session.get(ProviderRecord, provider), credential_type)


def new_credential_deprecated(engine: Any, *, provider: str, key_name: str, credential_type: str,
                              where: str) -> NewCredentialDeprecated:
    """The error that fails a run whose new credential the provider calls deprecated."""
    with session_scope(engine) as session:
        replacement = replacement_of(session, provider, credential_type)
    if replacement:
        advice = (f"the provider's policy replaces it with {replacement!r}: rotate {key_name} to {replacement!r} "
                  f"(a rotation request with target_credential_type={replacement!r})")
    else:
        advice = (f"no replacement type is declared for {credential_type!r} in provider {provider!r}: add "
                  "credential_types.<type>.replacement to the inventory, apply it, and rotate to that type")
    return NewCredentialDeprecated(
        f"{where}: provider {provider!r} rejects new {credential_type!r} credentials as deprecated; retrying will not "
        f"help; {advice}", credential_type=credential_type, replacement=replacement)


def report_deprecated(engine: Any, *, key_name: str, credential_type: str, requested_by: str) -> Optional[str]:
    """Tell the deprecation job that ``key_name``'s current ``credential_type`` credential is
    rejected as deprecated; returns the id of the run that will move it (None: stale, or the
    report failed — it is logged and never breaks the step that noticed)."""
    try:
        with session_scope(engine) as session:
            run = on_deprecated_response(session, key_name=key_name, credential_type=credential_type,
                                         requested_by=requested_by)
            run_id = run.id if run is not None else None
    except Exception as exc:  # the next 434 (or the scheduled due time) will try again
        log.error("deprecation.report_failed", key=key_name, credential_type=credential_type,
                     error=type(exc).__name__, detail=str(exc)[:200])
        return None
    log.warning("deprecation.reported", key=key_name, credential_type=credential_type, rotation_run_id=run_id)
    return run_id


def deprecated_failure_type(session: Session, run_id: str) -> Optional[str]:
    """The credential type whose deprecation sent this run down its failure path, if that was why."""
    events = session.exec(
        select(AuditEvent).where(AuditEvent.run_id == run_id, AuditEvent.event == "state_changed",
                                 AuditEvent.to_state.in_([RunState.compensating.value,  # type: ignore[union-attr]
                                                          RunState.rolling_back.value]))
        .order_by(AuditEvent.id.desc())  # type: ignore[union-attr]
    ).all()
    for event in events:
        value = (event.detail or {}).get(DEPRECATED_TYPE_FIELD)
        if isinstance(value, str) and value:
            return value
    return None
