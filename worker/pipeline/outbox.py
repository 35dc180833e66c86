"""The outbox: putting a run on the queue, only once the transaction that moved it commits.

``enqueue_run`` asks the protocol for the step that moves the run on from its state (none when it
waits for a person or is over) and sends it, delayed until ``not_before`` or the end of the grace
period. ``enqueue_after_commit`` sends the run's step once ``session`` commits, so a worker never
receives a run id it cannot read yet, and nothing is sent for a transaction that rolled back.
Every producer (requests, the scheduler's jobs, resolve, takeover, deposits) goes through here.
"""

from __future__ import annotations

from typing import Callable

from sqlmodel import Session

from worker.clock import as_utc, utcnow
from worker.db.models import RotationRun
from worker.db.session import after_commit
from worker.log import get_logger
from worker.queues import send_step
from worker.protocol import RunState, next_step

log = get_logger(__name__)

EnqueueFn = Callable[[RotationRun], None]


def enqueue_after_commit(session: Session, run: RotationRun, enqueue: EnqueueFn) -> None:
    """Send the run's step message once ``session`` commits (dropped if it rolls back)."""

    def send() -> None:
        try:
            enqueue(run)
        except Exception as exc:  # the reconciler re-enqueues runs whose message was lost
            log.error("enqueue_failed", run_id=run.id, error=type(exc).__name__, detail=str(exc)[:200])

    after_commit(session, send)


def enqueue_run(run: RotationRun) -> None:
    """Send the actor for the run's current state (no-op when the run waits or is over)."""
    state = run.state if isinstance(run.state, RunState) else RunState(run.state)
    step = next_step(run.mode, state)
    if step is None:
        return
    delay_s = 0.0
    now = utcnow()
    when = run.not_before if state == RunState.requested else run.grace_until if state == RunState.verified else None
    if when is not None:
        delay_s = max(0.0, (as_utc(when) - now).total_seconds())
    send_step(step, run.id, delay_ms=int(delay_s * 1000))
