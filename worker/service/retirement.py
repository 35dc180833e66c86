"""Retirement: runs in ``verified`` whose grace period is over get their retire step enqueued.

A run is claimed with a conditional UPDATE that sets a step deadline, so each run is enqueued
once per deadline (not on every pass while the queue is busy); if the retire step does not move
the run before that deadline, the reconciler re-enqueues it like any other stuck run.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.engine import Engine
from sqlmodel import col

from worker.pipeline.outbox import enqueue_after_commit
from worker.service.hooks import Pipeline, default_pipeline
from worker.clock import utcnow
from worker.db.models import RotationRun
from worker.protocol.states import RunState
from worker.db.session import session_scope
from worker.log import get_logger

log = get_logger(__name__)


def retire_due(
    engine: Engine,
    *,
    now: datetime | None = None,
    step_timeout_s: float = 900.0,
    batch: int = 500,
    pipeline: Pipeline | None = None,
) -> list[str]:
    """Enqueue the retire step of every run whose grace is over; returns the run ids enqueued."""
    now = now or utcnow()
    pipeline = pipeline or default_pipeline()
    unclaimed = or_(col(RotationRun.step_deadline_at).is_(None), col(RotationRun.step_deadline_at) < col(RotationRun.grace_until))
    enqueued: list[str] = []
    with session_scope(engine) as session:
        ids = session.scalars(
            select(col(RotationRun.id))
            .where(col(RotationRun.state) == RunState.verified.value, col(RotationRun.grace_until) <= now, unclaimed)
            .order_by(col(RotationRun.grace_until))
            .limit(batch)
        ).all()
    for run_id in ids:
        with session_scope(engine) as session:
            claimed = session.exec(
                update(RotationRun)
                .where(col(RotationRun.id) == run_id, col(RotationRun.state) == RunState.verified.value, unclaimed)
                .values(step_deadline_at=now + timedelta(seconds=step_timeout_s), updated_at=now)
            ).rowcount
            if claimed != 1:
                continue  # another scheduler pass or the worker moved it already
            run = session.get(RotationRun, run_id)
            assert run is not None
            enqueue_after_commit(session, run, pipeline.enqueue_run)
        enqueued.append(run_id)
        log.info("retire_enqueued", run_id=run_id)
    return enqueued
