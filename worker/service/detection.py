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

The runs of a pass are requested in one transaction (``worker.pipeline.batch_requests``) and
their messages sent after it commits; a message lost between the commit and the send is the
reconciler's, as for any run. A pass costs a fixed number of statements, not a few per key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping
from datetime import datetime, timedelta

from sqlalchemy import and_, case, exists, func, select
from sqlalchemy.engine import Engine
from sqlmodel import col

from worker.pipeline.batch_requests import RotationRequest, supports_batch
from worker.service.deprecation import replacement_type
from worker.pipeline.outbox import enqueue_after_commit
from worker.queues import batched_sends
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
                   retry_max: timedelta = DEFAULT_RETRY_MAX, with_attempts: bool = False):
    """SELECT of due keys, oldest due first (also used by the benchmark and `plan`): no open run,
    and no run for this due time that ended less than its backoff ago. The backoff per number of
    ended runs is a CASE over thresholds computed here, so the query is the same on SQLite and
    PostgreSQL (no date arithmetic in SQL). ``with_attempts`` adds each key's number of runs
    since its due time (the retry attempt), so detection needs no query per key."""
    open_run = exists().where(col(RotationRun.key_id) == col(ManagedKey.id), col(RotationRun.finished_at).is_(None))
    ended = select(func.count()).where(_since_due()).correlate(ManagedKey).scalar_subquery()
    last_end = select(func.max(RotationRun.finished_at)).where(_since_due()).correlate(ManagedKey).scalar_subquery()
    steps = [(n, now - retry_backoff(n, retry_base, retry_max)) for n in range(1, _MAX_DOUBLINGS + 2)
             if retry_backoff(n, retry_base, retry_max) < retry_max]
    threshold = case(*[(ended == n, at) for n, at in steps], else_=now - retry_max)
    backing_off = and_(ended > 0, last_end > threshold)
    columns: list[Any] = [ManagedKey, ended.label("attempt")] if with_attempts else [ManagedKey]
    return (
        select(*columns)
        .where(and_(col(ManagedKey.enabled).is_(True), col(ManagedKey.next_due_at) <= now, ~open_run, ~backing_off))
        .order_by(col(ManagedKey.next_due_at))
        .limit(batch)
    )


@dataclass(frozen=True)
class _Due:
    key_id: int
    name: str
    due_at: datetime
    reason: str | None
    target: str | None
    attempt: int

    def request(self) -> RotationRequest:
        return RotationRequest(key_name=self.name, reason=self.reason or "due", target_credential_type=self.target,
                               idempotency_key=due_idempotency_key(self.key_id, self.due_at, self.attempt))


@dataclass
class DetectionResult:
    requested: list[str] = field(default_factory=list)  # run ids created
    joined: list[str] = field(default_factory=list)     # run ids that already existed
    errors: dict[str, str] = field(default_factory=dict)  # key name → error class


def _due(session: Any, query: Any, keys: dict[str, ManagedKey]) -> list[_Due]:
    rows = session.execute(query).all()
    keys.update((k.name, k) for k, _ in rows)
    # A key due because its type is being deprecated migrates to the replacement type;
    # rotating to the same type would leave it due (the cutoff does not move).
    migrating = {k.provider for k, _ in rows if k.due_reason == "deprecation"}
    providers = {p.name: p for p in session.scalars(
        select(ProviderRecord).where(col(ProviderRecord.name).in_(migrating))).all()} if migrating else {}
    return [_Due(k.id, k.name, k.next_due_at, k.due_reason,
                 replacement_type(providers.get(k.provider), k.credential_type) if k.due_reason == "deprecation" else None,
                 int(attempt or 0)) for k, attempt in rows]


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
    """One detection pass: the due keys and their runs in one transaction (a fixed number of
    statements, whatever the number of keys due); messages are sent once it commits. If that
    transaction fails, each key is tried again in a transaction of its own, so one bad key
    cannot hold back the others."""
    now = now or utcnow()
    pipeline = pipeline or default_pipeline()
    result = DetectionResult()
    query = due_keys_query(now, batch, retry_base=retry_base, retry_max=retry_max, with_attempts=True)
    due: list[_Due] = []
    outcomes: Mapping[str, Any] | None = None
    try:
        # The messages of the created runs leave after the commit, together (one Redis round trip).
        with batched_sends(), session_scope(engine) as session:
            keys: dict[str, ManagedKey] = {}
            due = _due(session, query, keys)
            if due and pipeline.request_rotations is not None and supports_batch(session):
                outcomes = pipeline.request_rotations(session, [d.request() for d in due], trigger="schedule",
                                                      requested_by=requested_by, keys=keys)
                for outcome in outcomes.values():
                    if isinstance(outcome, tuple) and outcome[1]:
                        enqueue_after_commit(session, outcome[0], pipeline.enqueue_run)
    except Exception as exc:
        if not due:
            raise  # the query itself failed: nothing to fall back to
        log.warning("detection_batch_failed", keys=len(due), error=type(exc).__name__, detail=str(exc)[:300])
        outcomes = None
    for d in due:
        outcome = outcomes.get(d.name) if outcomes is not None else _request_one(engine, pipeline, d, requested_by)
        if not isinstance(outcome, tuple):
            error = outcome or RuntimeError("no outcome")
            log.error("detection_request_failed", key=d.name, error=type(error).__name__, detail=str(error)[:300])
            result.errors[d.name] = type(error).__name__
            continue
        run, created = outcome
        (result.requested if created else result.joined).append(run.id)
        log.info("rotation_due", key=d.name, run_id=run.id, trigger="schedule", reason=d.reason,
                 due_at=as_utc(d.due_at).isoformat(), created=created, attempt=d.attempt + 1)
    return result


def _request_one(engine: Engine, pipeline: Pipeline, d: _Due, requested_by: str) -> Any:
    """One key in a transaction of its own: ``(run, created)``, or the error (logged by the caller)."""
    try:
        with session_scope(engine) as session:
            request = d.request()
            run, created = pipeline.request_rotation(
                session, key_name=d.name, reason=request.reason, trigger="schedule", requested_by=requested_by,
                idempotency_key=request.idempotency_key, target_credential_type=d.target)
            if created:
                enqueue_after_commit(session, run, pipeline.enqueue_run)
    except Exception as exc:  # logged and retried on the next pass
        return exc
    return run, created
