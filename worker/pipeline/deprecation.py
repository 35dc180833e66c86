"""What the pipeline does when a provider says a credential type is deprecated (Asana's 434).

Two different situations (docs/internals.md, "Deprecation responses"):

- the key's *current* (old) credential is rejected as deprecated: the key must move to the
  replacement type. ``report_deprecated`` calls ``worker.service.deprecation.on_deprecated_response`` in its
  own transaction, after the step's transaction committed; it joins the key's open run (so it is
  idempotent and harmless while the run that noticed is still open) and otherwise creates and
  enqueues a rotation to the replacement type.
- the *new* credential is deprecated (the run issued, or tried to issue, a type the provider no
  longer accepts): retrying cannot help, so ``NewCredentialDeprecated`` (a ``PermanentError``)
  fails the run at once with a message naming the replacement type. When that type is also the
  key's current type, the run's clean-up step reports it once the run is over, so a run to the
  replacement follows (see ``steps.compensate``/``steps.rollback``).
"""

from __future__ import annotations

from typing import Any, Optional

from sqlmodel import Session, select

from worker import log
from worker.db.models import AuditEvent, ProviderRecord
from worker.protocol.states import RunState
from worker.db.session import session_scope
from worker.errors import PermanentError
from worker.service.deprecation import on_deprecated_response, replacement_type

logger = log.get_logger("keyrotor.pipeline.deprecation")

#: The audit detail field that marks a failure caused by a deprecated credential type.
DEPRECATED_TYPE_FIELD = "deprecated_type"


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
        logger.error("deprecation.report_failed", key=key_name, credential_type=credential_type,
                     error=type(exc).__name__, detail=str(exc)[:200])
        return None
    logger.warning("deprecation.reported", key=key_name, credential_type=credential_type, rotation_run_id=run_id)
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
