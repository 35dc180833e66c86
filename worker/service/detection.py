"""Detection: request a rotation for every enabled key whose ``next_due_at`` has passed.

The query walks ``ix_managed_key_next_due_at`` from the oldest due time and stops after
``batch`` rows, so its cost follows the number of keys due, not the size of the inventory.
Keys with an open run are skipped. A key whose run for this due time already ended and that is
*still due* (the run failed and alerted; the cutoff does not move) is tried again, with backoff:
``retry_base`` after the first run ended, then twice as long after each further one, at most
``retry_max`` (``retry_backoff``). Retrying in a loop would hammer the provider; never retrying
would let a transient outage at the wrong moment turn into an expired key.

Each request carries an idempotency key derived from the key, its due time and the attempt, so
two schedulers (or a scheduler that lost its lock mid-pass) produce one run per due key and try.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from datetime import datetime, timedelta

from sqlalchemy import and_, case, exists, func, or_, select
from sqlalchemy.engine import Engine
from sqlmodel import col

from worker.service.deprecation import replacement_type
from worker.pipeline.outbox import enqueue_after_commit
from worker.service.hooks import Pipeline, default_pipeline
from worker.clock import as_utc, utcnow
from worker.db.models import ManagedKey, ProviderRecord, RotationRun
from worker.db.session import session_scope
from worker.log import get_logger

log = get_logger(__name__)


#: A still-due key whose run ended is tried again this long after, doubling each time, capped.
DEFAULT_RETRY_BASE = timedelta(minutes=15)
DEFAULT_RETRY_MAX = timedelta(hours=6)
_MAX_DOUBLINGS = 16


def due_idempotency_key(key_id: int, due_at: datetime, attempt: int = 0) -> str:
    """Same key, same due time, same attempt → same run, whichever scheduler asks."""
    base = f"due:{key_id}:{int(as_utc(due_at).timestamp())}"
    return base if attempt == 0 else f"{base}:retry{attempt}"


def retry_backoff(runs_ended: int, base: timedelta = DEFAULT_RETRY_BASE, most: timedelta = DEFAULT_RETRY_MAX) -> timedelta:
    """How long after the last ended run a still-due key is tried again (``runs_ended`` >= 1)."""
    return min(most, base * (2 ** min(max(runs_ended - 1, 0), _MAX_DOUBLINGS)))


def _since_due():
    return and_(col(RotationRun.key_id) == col(ManagedKey.id), col(RotationRun.created_at) >= col(ManagedKey.next_due_at))


def due_keys_query(now: datetime, batch: int, *, retry_base: timedelta = DEFAULT_RETRY_BASE,
                   retry_max: timedelta = DEFAULT_RETRY_MAX):
    """SELECT of due keys, oldest due first (also used by the benchmark and `plan`): no open run,
    and no run for this due time that ended less than its backoff ago. The backoff per number of
    ended runs is a CASE over thresholds computed here, so the query is the same on SQLite and
    PostgreSQL (no date arithmetic in SQL)."""
    open_run = exists().where(col(RotationRun.key_id) == col(ManagedKey.id), col(RotationRun.finished_at).is_(None))
    ended = select(func.count()).where(_since_due()).correlate(ManagedKey).scalar_subquery()
    last_end = select(func.max(RotationRun.finished_at)).where(_since_due()).correlate(ManagedKey).scalar_subquery()
    steps = [(n, now - retry_backoff(n, retry_base, retry_max)) for n in range(1, _MAX_DOUBLINGS + 2)
             if retry_backoff(n, retry_base, retry_max) < retry_max]
    threshold = case(*[(ended == n, at) for n, at in steps], else_=now - retry_max)
    backing_off = and_(ended > 0, last_end > threshold)
    return (
        select(ManagedKey)
        .where(and_(col(ManagedKey.enabled).is_(True), col(ManagedKey.next_due_at) <= now, ~open_run, ~backing_off))
        .order_by(col(ManagedKey.next_due_at))
        .limit(batch)
    )


def _runs_ended_since_due(session: Any, key_id: int, due_at: datetime) -> int:
    return int(session.scalar(select(func.count()).where(col(RotationRun.key_id) == key_id, col(RotationRun.created_at) >= due_at)) or 0)


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
    retry_base: timedelta = DEFAULT_RETRY_BASE,
    retry_max: timedelta = DEFAULT_RETRY_MAX,
) -> DetectionResult:
    """One detection pass. One transaction per key, so one bad key cannot hold back the others."""
    now = now or utcnow()
    pipeline = pipeline or default_pipeline()
    result = DetectionResult()
    with session_scope(engine) as session:
        due = []
        query = due_keys_query(now, batch, retry_base=retry_base, retry_max=retry_max)
        for k in session.scalars(query).all():
            # A key due because its type is being deprecated migrates to the replacement type;
            # rotating to the same type would leave it due (the cutoff does not move).
            target = replacement_type(session.get(ProviderRecord, k.provider), k.credential_type) if k.due_reason == "deprecation" else None
            attempt = _runs_ended_since_due(session, k.id, k.next_due_at)
            due.append((k.id, k.name, k.next_due_at, k.due_reason, target, attempt))
    for key_id, name, due_at, reason, target, attempt in due:
        try:
            with session_scope(engine) as session:
                run, created = pipeline.request_rotation(
                    session,
                    key_name=name,
                    reason=reason or "due",
                    trigger="schedule",
                    requested_by=requested_by,
                    idempotency_key=due_idempotency_key(key_id, due_at, attempt),
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
        log.info("rotation_due", key=name, run_id=run_id, reason=reason, due_at=as_utc(due_at).isoformat(), created=created,
                 attempt=attempt + 1)
    return result
