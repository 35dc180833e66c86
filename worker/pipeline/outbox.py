"""The two pipeline calls the scheduled jobs need, behind one seam so jobs can be tested alone.

The real ones are ``worker.pipeline.requests.request_rotation`` and ``enqueue_run`` (see
docs/internals.md, "Rotation requests"). A run is enqueued only *after* the transaction that
created it commits, so a worker never receives a run id it cannot read yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from sqlalchemy import event
from sqlmodel import Session

from worker.db.models import RotationRun
from worker.log import get_logger

log = get_logger(__name__)

RequestFn = Callable[..., "tuple[RotationRun, bool]"]
EnqueueFn = Callable[[RotationRun], None]

_PENDING = "keyrotor_enqueue_after_commit"


@dataclass(frozen=True)
class Pipeline:
    request_rotation: RequestFn
    enqueue_run: EnqueueFn


def default_pipeline() -> Pipeline:
    """The real pipeline (imported late: the scheduler must start even if a worker module is slow to import)."""
    from worker.pipeline.requests import enqueue_run, request_rotation

    return Pipeline(request_rotation=request_rotation, enqueue_run=enqueue_run)


def enqueue_after_commit(session: Session, run: RotationRun, enqueue: EnqueueFn) -> None:
    """Send the run's step message once ``session`` commits (dropped if it rolls back)."""
    pending: list[tuple[RotationRun, EnqueueFn]] | None = session.info.get(_PENDING)
    if pending is None:
        pending = session.info[_PENDING] = []

        def _after_commit(sess: Any) -> None:
            todo = list(sess.info.get(_PENDING) or [])
            sess.info[_PENDING] = []
            for queued_run, send in todo:
                try:
                    send(queued_run)
                except Exception as exc:  # the reconciler re-enqueues runs whose message was lost
                    log.error("enqueue_failed", run_id=queued_run.id, error=type(exc).__name__, detail=str(exc)[:200])

        def _after_rollback(sess: Any) -> None:
            sess.info[_PENDING] = []

        event.listen(session, "after_commit", _after_commit)
        event.listen(session, "after_soft_rollback", lambda sess, _tx: _after_rollback(sess))
    pending.append((run, enqueue))
