"""Drive a run through its steps in this thread, without a broker (unit tests, benchmarks).

Delays (polling, grace, retry backoff) are handed to ``advance(seconds)``, which tests use to
move an injected clock forward instead of sleeping.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Optional

from worker.db.session import session_scope
from worker.pipeline.context import PipelineContext
from worker.pipeline.runs import load_run, run_state
from worker.pipeline.steps import execute
from worker.protocol import RunState, Step, next_step


def drive(ctx: PipelineContext, run_id: str, *, advance: Optional[Callable[[float], None]] = None,
          max_steps: int = 500, stop_at: Optional[set[RunState]] = None) -> RunState:
    """Run steps until the run waits or ends (or reaches a state in ``stop_at``); return its state."""
    def current() -> tuple[RunState, str]:
        with session_scope(ctx.engine) as session:
            run = load_run(session, run_id)
            assert run is not None, f"no run {run_id}"
            return run_state(run), run.mode

    state, mode = current()
    first = next_step(mode, state)
    queue: deque[tuple[Step, int, int]] = deque([(first, 0, 0)] if first else [])
    for _ in range(max_steps):
        if not queue or (stop_at and current()[0] in stop_at):
            break
        step, delay_ms, retries = queue.popleft()
        if delay_ms and advance is not None:
            advance(delay_ms / 1000)
        action = execute(ctx, step, run_id, retry_count=retries)
        if action.retry:
            queue.append((step, action.delay_ms, retries + 1))
        elif action.step is not None:
            queue.append((action.step, action.delay_ms, 0))
    else:
        raise RuntimeError(f"run {run_id} did not settle within {max_steps} steps")
    return current()[0]
