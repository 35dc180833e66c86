"""Running one step for one run: ``execute`` sets up the run lease, calls the step, and turns its
outcome or failure into an ``Action`` (next step, delay, retry) for the actor or inline driver."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, Optional

from worker import log
from worker.clock import utcnow
from worker.db.session import session_scope
from worker.errors import StateConflict
from worker.metrics import DEAD_LETTERS, STEP_DURATION, STEP_FAILURES
from worker.pipeline import handoff, retries
from worker.pipeline.context import PipelineContext
from worker.pipeline.effects import safe_error, seconds_between
from worker.pipeline.lease import Lease, LeaseHeld, current_lease
from worker.pipeline.runs import load_run, note_attempt, run_state
from worker.pipeline.steps.common import RunMissing, StepOutcome
from worker.pipeline.steps.issuing import issue, request_deposit
from worker.pipeline.steps.promotion import precheck, promote
from worker.pipeline.steps.recovery import compensate, fail_run, rollback
from worker.pipeline.steps.retirement import finish, retire
from worker.pipeline.steps.sinks import propagate, verify
from worker.retry import backoff_ceiling, equal_jitter
from worker.protocol import FailureKind, Step, expected_state, next_step, parse_mode

logger = log.get_logger("keyrotor.pipeline")


@dataclass(frozen=True)
class Action:
    """What the caller (a Dramatiq actor or the inline driver) must do after a step ran."""

    step: Optional[Step] = None   # send this step for the run ...
    delay_ms: int = 0             # ... after this delay
    retry: bool = False           # re-deliver the same message (counts against the retry budget)


STEPS: dict[Step, Callable[[PipelineContext, str], Optional[StepOutcome]]] = {
    Step.issue: issue,
    Step.request_deposit: request_deposit,
    Step.precheck: precheck,
    Step.promote: promote,
    Step.propagate: propagate,
    Step.verify: verify,
    Step.retire: retire,
    Step.finish: finish,
    Step.compensate: compensate,
    Step.rollback: rollback,
}


def execute(ctx: PipelineContext, step: Step, run_id: str, *, retry_count: int = 0) -> Action:
    """Run one step for one run and say what to do next. Never raises for expected failures."""
    log.bind(run_id=run_id, step=step.value)
    started = time.monotonic()
    lease = Lease(ctx.engine, run_id, actor=ctx.actor, ttl_s=ctx.policy.lease_ttl_s,
                  max_s=ctx.policy.time_limit_ms / 1000, owner=handoff.chain_owner())
    lease_token = current_lease.set(lease)
    try:
        try:
            outcome = STEPS[step](ctx, run_id)
        except RunMissing as exc:
            return _on_missing(ctx, step, run_id, exc, retry_count)
        except LeaseHeld as exc:
            return _on_lease_held(step, exc)
        except StateConflict as exc:
            logger.info("step.conflict", detail=str(exc))
            return Action()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # includes Dramatiq's TimeLimitExceeded (an Interrupt)
            return _on_error(ctx, step, run_id, exc, retry_count)
        if outcome is None:
            return Action()
        if outcome.again_in_s is not None:
            return Action(step=step, delay_ms=int(outcome.again_in_s * 1000))
        following = next_step(outcome.mode, outcome.state)
        return Action(step=following, delay_ms=int(outcome.next_in_s * 1000)) if following else Action()
    finally:
        current_lease.reset(lease_token)
        lease.close()
        STEP_DURATION.labels(step=step.value).observe(time.monotonic() - started)
        log.unbind("run_id", "step", "key")


def _on_missing(ctx: PipelineContext, step: Step, run_id: str, exc: RunMissing, retry_count: int) -> Action:
    """Retry a message for an unreadable run a bounded number of times, then give it up (recorded:
    log line, ``keyrotor_step_failures_total{error="RunMissing"}``, ``keyrotor_dead_letters_total``)."""
    STEP_FAILURES.labels(step=step.value, error=retries.error_label(exc)).inc()
    policy = ctx.policy
    if retry_count < policy.missing_run_retries:
        delay_ms = int(equal_jitter(backoff_ceiling(retry_count, policy.missing_run_backoff_ms, 10_000)))
        logger.warning("run.missing", run_id=run_id, step=step.value, retry_in_ms=delay_ms, retries=retry_count,
                       detail="not readable yet; the producer's commit may still be in flight")
        return Action(step=step, delay_ms=delay_ms, retry=True)
    DEAD_LETTERS.labels(step=step.value).inc()
    logger.error("run.missing.dropped", run_id=run_id, step=step.value, retries=retry_count,
                 detail="the run never became readable; check that producer and worker use the same database")
    return Action()


def _on_lease_held(step: Step, exc: LeaseHeld) -> Action:
    """Another execution is doing this step now: come back when its lease would lapse (then the
    run has moved on and this message is dropped, or the holder died and this one takes over).
    A fresh message, not a retry: waiting for a live holder must not use up the retry budget."""
    wait_s = seconds_between(exc.until, utcnow()) if exc.until is not None else 1.0
    delay_ms = int(max(0.2, wait_s) * 1000 + random.uniform(0, 500))
    logger.info("step.lease_held", holder=exc.owner, retry_in_ms=delay_ms)
    return Action(step=step, delay_ms=delay_ms)


def _on_error(ctx: PipelineContext, step: Step, run_id: str, exc: BaseException, retry_count: int) -> Action:
    """Retry within the step's budget, or take the failure path. The budget is the run's persisted
    ``attempts`` (failed executions of its current step), not the message's own retry count: a
    reconciler re-enqueue or a duplicate message is a fresh Dramatiq message, and must not start a
    fresh budget."""
    STEP_FAILURES.labels(step=step.value, error=retries.error_label(exc)).inc()
    with session_scope(ctx.engine) as session:
        run = load_run(session, run_id)
        if run is None or run_state(run) != expected_state(step):
            return Action()
        mode = parse_mode(run.mode)
        failures = run.attempts
        decision = retries.decide(exc, failures, ctx.policy)
        if decision.retry:
            note_attempt(session, run, actor=ctx.actor, step=step.value, error=safe_error(exc),
                         delay_s=decision.delay_ms / 1000, time_limit_s=ctx.policy.time_limit_ms / 1000)
    if decision.retry:
        logger.warning("step.retry", error=safe_error(exc), retry_in_ms=decision.delay_ms, retries=failures,
                       message_retries=retry_count)
        return Action(step=step, delay_ms=decision.delay_ms, retry=True)
    kind = FailureKind.permanent if retries.is_permanent(exc) else FailureKind.exhausted
    target = fail_run(ctx, run_id, step, exc, kind)
    following = next_step(mode, target) if target is not None else None
    return Action(step=following) if following else Action()
