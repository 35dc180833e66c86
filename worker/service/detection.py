"""Detection: request a rotation for every enabled key whose ``next_due_at`` has passed.

The query walks ``ix_managed_key_next_due_at`` from the oldest due time and stops after
``batch`` rows, so its cost follows the number of keys due, not the size of the inventory.
Keys with an open run, or whose scheduled run for this very due time already ended (it failed
and alerted; retrying the same due time in a loop would hammer the provider), are skipped.

Each request carries an idempotency key derived from the key and its due time, so two
schedulers (or a scheduler that lost its lock mid-pass) produce one run per due key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import and_, exists, or_, select
from sqlalchemy.engine import Engine

from worker.service.deprecation import replacement_type
from worker.pipeline.outbox import enqueue_after_commit
from worker.service.hooks import Pipeline, default_pipeline
from worker.clock import as_utc, utcnow
from worker.db.models import ManagedKey, ProviderRecord, RotationRun
from worker.db.session import session_scope
from worker.log import get_logger

log = get_logger(__name__)


def due_idempotency_key(key_id: int, due_at: datetime) -> str:
    """Same key, same due time → same run, whichever scheduler asks."""
    return f"due:{key_id}:{int(as_utc(due_at).timestamp())}"  # type: ignore[union-attr]


def due_keys_query(now: datetime, batch: int):  # type: ignore[no-untyped-def]
    """SELECT of due keys, oldest due first (also used by the benchmark and `plan`)."""
    blocking_run = exists().where(
        RotationRun.key_id == ManagedKey.id,
        or_(RotationRun.finished_at.is_(None), RotationRun.created_at >= ManagedKey.next_due_at),  # type: ignore[union-attr,attr-defined,operator]
    )
    return (
        select(ManagedKey)
        .where(and_(ManagedKey.enabled.is_(True), ManagedKey.next_due_at <= now, ~blocking_run))  # type: ignore[union-attr,attr-defined,operator]
        .order_by(ManagedKey.next_due_at)  # type: ignore[arg-type]
        .limit(batch)
    )


@dataclass
class DetectionResult:
    requested: list[str] = field(default_factory=list)  # run ids created
    joined: list[str] = field(default_factory=list)     # run ids that already existed
    errors: dict[str, str] = field(default_factory=dict)  # key name → error class


def detect_due(
    engine: Engine,
    *,
    now: datetime | None = None,
    batch: int = 500,
    pipeline: Pipeline | None = None,
    requested_by: str = "scheduler",
) -> DetectionResult:
    """One detection pass. One transaction per key, so one bad key cannot hold back the others."""
    now = now or utcnow()
    pipeline = pipeline or default_pipeline()
    result = DetectionResult()
    with session_scope(engine) as session:
        due = []
        for k in session.scalars(due_keys_query(now, batch)).all():  # type: ignore[call-overload]
            # A key due because its type is being deprecated migrates to the replacement type;
            # rotating to the same type would leave it due (the cutoff does not move).
            target = replacement_type(session.get(ProviderRecord, k.provider), k.credential_type) if k.due_reason == "deprecation" else None
            due.append((k.id, k.name, k.next_due_at, k.due_reason, target))
    for key_id, name, due_at, reason, target in due:
        try:
            with session_scope(engine) as session:
                run, created = pipeline.request_rotation(
                    session,
                    key_name=name,
                    reason=reason or "due",
                    trigger="schedule",
                    requested_by=requested_by,
                    idempotency_key=due_idempotency_key(key_id, due_at),
                    target_credential_type=target,
                )
                if created:
                    enqueue_after_commit(session, run, pipeline.enqueue_run)
                run_id = run.id
        except Exception as exc:  # logged and retried on the next pass
            log.error("detection_request_failed", key=name, error=type(exc).__name__, detail=str(exc)[:300])
            result.errors[name] = type(exc).__name__
            continue
        (result.requested if created else result.joined).append(run_id)
        log.info("rotation_due", key=name, run_id=run_id, reason=reason, due_at=as_utc(due_at).isoformat(), created=created)  # type: ignore[union-attr]
    return result
