"""One Dramatiq actor per protocol step, the dead-letter actor and the rotation-request actor.

An actor is a thin shell: read the retry count of the current message, run ``steps.execute``,
then either raise ``dramatiq.Retry`` with the computed delay (Dramatiq re-enqueues and counts it),
or run the steps that follow without a wait in the same message and send the first that must wait
(``worker/runtime/chains.py``). Actors are declared per broker (``declare_actors``) so tests can
switch between a StubBroker and a RedisBroker in one process.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import dramatiq
from dramatiq.middleware import CurrentMessage

from worker import log
from worker.db.session import session_scope
from worker.metrics import DEAD_LETTERS
from worker.pipeline.context import PipelineContext, default_policy, get_context
from worker.pipeline.effects import chain_memory
from worker.pipeline.handoff import chain_handoffs, pending_for, set_continuation
from worker.pipeline.messages import consume, reject
from worker.queues import REQUEST_ACTOR, REQUEST_QUEUE, STEP_QUEUE, actor_name, register_actors, send_step
from worker.pipeline.runs import load_run, run_state
from worker.pipeline.steps import Action, execute, fail_run
from worker.runtime.chains import MAX_FUSED_STEPS, TIME_LIMIT_SHARE, ChainMarks, chain_marks
from worker.protocol import FailureKind, Step, next_step

logger = log.get_logger("keyrotor.pipeline.actors")

_actors: dict[str, dramatiq.Actor] = {}
_broker_id: Optional[int] = None


def _step_fn(step: Step) -> Callable[[str], None]:
    def run_step(run_id: str) -> None:
        message = CurrentMessage.get_current_message()
        retry_count = int(message.options.get("retries", 0)) if message is not None else 0
        ctx = get_context()
        with chain_memory(), chain_handoffs(ctx.engine, ctx.actor):
            action = execute(ctx, step, str(run_id), retry_count=retry_count)
            if action.retry:
                # ``from None``: Dramatiq stores the traceback in the message; keep it to our text.
                raise dramatiq.Retry(f"retrying step {step.value}", delay=action.delay_ms) from None
            message_id = message.message_id if message is not None else None
            marks = chain_marks(dramatiq.get_broker())
            if action.step is None and message_id is not None and marks.marked(message_id):
                action = _resume(ctx, str(run_id))
            _run_chain(ctx, str(run_id), action, message_id, marks)

    run_step.__name__ = actor_name(step)
    return run_step


def _resume(ctx: PipelineContext, run_id: str) -> Action:
    """This message fused steps before its worker died: go on from where the run is now."""
    with session_scope(ctx.engine) as session:
        run = load_run(session, run_id)
        following = next_step(run.mode, run_state(run)) if run is not None else None
    if following is not None:
        logger.info("chain.resumed", run_id=run_id, step=following.value)
    return Action(step=following)


def _run_chain(ctx: PipelineContext, run_id: str, action: Action, message_id: Optional[str], marks: ChainMarks) -> None:
    """Run the steps that follow without a wait in this message (``worker/runtime/chains.py``);
    the first that must wait, or one past the chain's budget, goes to the queue."""
    started = time.monotonic()
    budget_s = ctx.policy.time_limit_ms / 1000 * TIME_LIMIT_SHARE
    marked = False
    fused = 0

    def may_fuse(steps_done: int) -> bool:
        return steps_done < MAX_FUSED_STEPS and time.monotonic() - started < budget_s

    # A step's transition claims the next step for this chain only if the chain will run it
    # (worker/pipeline/handoff.py); one it claimed is run whatever the clock says by then.
    set_continuation(lambda: may_fuse(fused + 1))
    while (action.step is not None and action.delay_ms == 0
           and (pending_for(run_id, action.step) or may_fuse(fused))):
        if not marked and message_id is not None:
            marks.mark(message_id, ttl_s=2 * ctx.policy.time_limit_ms / 1000)
            marked = True
        current = action.step
        try:
            action = execute(ctx, current, run_id)
        except Exception as exc:
            # Escaped the step's own handling (e.g. the database is down): the step goes to the
            # queue on its own, where Dramatiq's retries and the dead letter cover it.
            logger.warning("chain.step_escaped", run_id=run_id, step=current.value, error=type(exc).__name__)
            send_step(current, run_id, delay_ms=ctx.policy.min_backoff_ms)
            action = Action()
            break
        fused += 1
        if action.retry:  # a fresh message for the step that failed (its budget is the run's attempts)
            action = Action(step=current, delay_ms=action.delay_ms)
            break
    if action.step is not None:
        send_step(action.step, run_id, delay_ms=action.delay_ms)
    if marked and message_id is not None:
        marks.clear(message_id)


def dead_letter(message_data: dict[str, Any], retry_info: dict[str, Any]) -> None:
    """A step message whose retries Dramatiq exhausted (errors escaped the step's own handling,
    e.g. the database was down): record it on the run and in the audit trail."""
    name = str(message_data.get("actor_name", ""))
    args = message_data.get("args") or []
    DEAD_LETTERS.labels(step=name.removeprefix("step_") or "unknown").inc()
    logger.error("message.dead_letter", actor=name, retries=retry_info.get("retries"))
    if not name.startswith("step_") or not args:
        return
    try:
        step = Step(name.removeprefix("step_"))
    except ValueError:
        return
    target = fail_run(get_context(), str(args[0]), step,
                      RuntimeError(f"dead letter: {retry_info.get('retries')} retries exhausted"), FailureKind.exhausted)
    if target is not None:
        with session_scope(get_context().engine) as session:
            run = load_run(session, str(args[0]))
            following = next_step(run.mode, target) if run is not None else None
        if following is not None:
            send_step(following, str(args[0]))


def rotation_requests(payload: Any = None, *args: Any, **kwargs: Any) -> None:
    """Actor: one rotation request. Any shape is accepted at the Dramatiq level so that a
    malformed message is rejected by us, with a reason, rather than crash the worker."""
    message = CurrentMessage.get_current_message()
    message_id = message.message_id if message is not None else None
    if args or kwargs:
        reject(get_context().engine, "expected exactly one argument: the request object", "bad_envelope", message_id)
        return
    consume(payload, engine=get_context().engine, message_id=message_id)


def declare_request_actor(broker: dramatiq.Broker) -> dramatiq.Actor:
    # Transient errors (database down) are retried by Dramatiq; validation failures never raise.
    return dramatiq.actor(actor_name=REQUEST_ACTOR, queue_name=REQUEST_QUEUE, broker=broker,
                          max_retries=10, min_backoff=1000, max_backoff=60_000)(rotation_requests)


def declare_actors(broker: dramatiq.Broker) -> dict[str, dramatiq.Actor]:
    """Declare every pipeline actor on ``broker`` (idempotent per broker)."""
    global _broker_id
    if _broker_id == id(broker) and _actors:
        return _actors
    policy = default_policy()
    _actors.clear()
    _actors["dead_letter"] = dramatiq.actor(actor_name="dead_letter", queue_name=STEP_QUEUE, broker=broker,
                                            max_retries=3)(dead_letter)
    for step in Step:
        _actors[actor_name(step)] = dramatiq.actor(
            actor_name=actor_name(step), queue_name=STEP_QUEUE, broker=broker,
            # Our own policy decides retries first (steps.execute); Dramatiq's bound and backoff
            # only apply to errors that escape it, which then end in ``dead_letter``.
            max_retries=policy.max_retries + 1, min_backoff=policy.min_backoff_ms,
            max_backoff=policy.max_backoff_ms, time_limit=policy.time_limit_ms,
            on_retry_exhausted="dead_letter",
        )(_step_fn(step))
    _actors["rotation_requests"] = declare_request_actor(broker)
    _broker_id = id(broker)
    register_actors(_actors)
    return _actors
