"""Creating rotation runs (``request_rotation``); ``worker.pipeline.outbox.enqueue_run`` puts them on the queue.

Invariant 3 is the database's: the partial unique index allows one open run per key, and the
idempotency key is unique. A request that loses a race to either constraint returns the run that
won, so every producer (CLI, scheduler, queue message) can simply retry.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Optional

from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select, Session

from worker import log
from worker.clock import as_utc, utcnow
from worker.db.models import AuditEvent, ManagedKey, ProviderRecord, RotationRun, saved_id
from worker.protocol.states import RunState
from worker.errors import PermanentError
from worker.pipeline.runs import open_run_for_key
from worker.protocol import parse_mode
from worker.pipeline.context import default_policy
from worker.pipeline.takeover import TAKEOVER_STATES, take_over
from worker.pipeline.targets import rotation_target

logger = log.get_logger("keyrotor.pipeline.requests")


class UnknownKey(PermanentError):
    """The request names a key that is not in the applied inventory."""


def new_run_id() -> str:
    return uuid.uuid4().hex


def _by_idempotency_key(session: Session, idempotency_key: str) -> Optional[RotationRun]:
    return session.exec(select(RotationRun).where(RotationRun.idempotency_key == idempotency_key)).first()


def _existing(session: Session, key: ManagedKey, idempotency_key: Optional[str]) -> Optional[RotationRun]:
    if idempotency_key:
        run = _by_idempotency_key(session, idempotency_key)
        if run is not None:
            if run.key_id != key.id:
                raise PermanentError(f"idempotency key {idempotency_key!r} was already used for another key; "
                                     "use a fresh one per request")
            return run
    assert key.id is not None
    return open_run_for_key(session, key.id)


def request_rotation(
    session: Session,
    *,
    key_name: str,
    reason: str,
    trigger: str,
    requested_by: str,
    idempotency_key: Optional[str] = None,
    not_before: Optional[datetime] = None,
    emergency: bool = False,
    target_credential_type: Optional[str] = None,
) -> tuple[RotationRun, bool]:
    """Create a run for ``key_name`` → ``(run, True)``; or return the run this request joins
    (same idempotency key, or the key's open run) → ``(run, False)``. The caller commits."""
    key = session.exec(select(ManagedKey).where(ManagedKey.name == key_name)).first()
    if key is None:
        raise UnknownKey(f"no managed key named {key_name!r}; check the name with `keyrotor status`")
    if not key.enabled:
        raise PermanentError(f"key {key_name!r} is disabled in the inventory; enable it to rotate it")
    provider = session.get(ProviderRecord, key.provider)

    # A deprecated type moves to its replacement whoever asked (CLI, queue, emergency, scheduler);
    # a type named explicitly is checked here, before anything is recorded.
    target_credential_type = rotation_target(
        provider=key.provider, provider_spec=provider.spec if provider else None, current_type=key.credential_type,
        requested=target_credential_type, now=utcnow())
    existing = _existing(session, key, idempotency_key)
    superseded: Optional[str] = None
    if existing is not None and emergency and _takes_over(existing, idempotency_key):
        if take_over(session, existing, requested_by=requested_by, reason=reason) == "cancelled":
            superseded, existing = existing.id, None  # ended: a fresh emergency run replaces it
    if existing is not None:
        _audit_join(session, existing, requested_by, trigger, reason, idempotency_key)
        if emergency:
            _escalate(session, existing, requested_by)
        return existing, False
    now = utcnow()
    run = RotationRun(
        id=new_run_id(), key_id=saved_id(key), state=RunState.requested, mode=parse_mode(provider.mode if provider else None).value,
        trigger=trigger, reason=reason, requested_by=requested_by, idempotency_key=idempotency_key,
        emergency=emergency, target_credential_type=target_credential_type, attempts=0,
        not_before=as_utc(not_before), created_at=now, updated_at=now,
        step_deadline_at=first_step_deadline(now, as_utc(not_before)),
    )
    savepoint = session.begin_nested()
    try:
        session.add(run)
        session.flush()
    except IntegrityError:
        savepoint.rollback()  # another producer won the race for this key or idempotency key
        existing = _existing(session, key, idempotency_key)
        if existing is None:
            raise
        _audit_join(session, existing, requested_by, trigger, reason, idempotency_key)
        return existing, False
    savepoint.commit()
    session.add(AuditEvent(at=now, run_id=run.id, key_id=key.id, actor=requested_by, event="state_changed",
                           from_state=None, to_state=RunState.requested.value,
                           detail={"trigger": trigger, "reason": reason, "idempotency_key": idempotency_key,
                                   "emergency": emergency, "target_credential_type": target_credential_type,
                                   **({"supersedes": superseded} if superseded else {})}))
    session.flush()
    logger.info("run.requested", run_id=run.id, key=key_name, trigger=trigger, reason=reason)
    return run, True


def _takes_over(run: RotationRun, idempotency_key: Optional[str]) -> bool:
    """An emergency takes over a key's open run that waits for a person (not a repeat of itself)."""
    same_request = idempotency_key is not None and run.idempotency_key == idempotency_key
    return not same_request and run.finished_at is None and RunState(run.state) in TAKEOVER_STATES


def first_step_deadline(now: datetime, not_before: Optional[datetime] = None) -> datetime:
    """When the reconciler may re-enqueue a new run whose first message was lost (the worker
    died, or the enqueue after the commit failed): like any step, twice the step time limit
    after it could start."""
    start = max(now, not_before) if not_before is not None else now
    return start + timedelta(seconds=2 * default_policy().time_limit_ms / 1000)


def _audit_join(session: Session, run: RotationRun, requested_by: str, trigger: str, reason: str,
                idempotency_key: Optional[str]) -> None:
    session.add(AuditEvent(at=utcnow(), run_id=run.id, key_id=run.key_id, actor=requested_by, event="request_joined",
                           detail={"trigger": trigger, "reason": reason, "idempotency_key": idempotency_key}))


def _escalate(session: Session, run: RotationRun, requested_by: str) -> None:
    """An emergency joining an ordinary open run makes it an emergency: no grace period, so the
    old (possibly leaked) key is revoked as soon as the new one is verified. A run already in
    grace has it cut short; the retirement job picks it up on its next tick."""
    from sqlalchemy import update

    if run.emergency or run.finished_at is not None:
        return
    now = utcnow()
    values: dict[str, object] = {"emergency": True, "updated_at": now}
    if run.grace_until is not None and as_utc(run.grace_until) > now:
        values["grace_until"] = now
    moved = session.exec(
        update(RotationRun).where(col(RotationRun.id) == run.id, col(RotationRun.finished_at).is_(None))
        .values(**values).execution_options(synchronize_session=False))
    if moved.rowcount == 1:
        session.add(AuditEvent(at=now, run_id=run.id, key_id=run.key_id, actor=requested_by,
                               event="escalated_to_emergency",
                               detail={"grace_cut_short": "grace_until" in values}))
        session.flush()
        session.refresh(run)


