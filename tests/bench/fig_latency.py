"""Figure 2: one key rotated alone, end to end, and where the time goes.

Each trial: the floor's 8 essential calls made one after the other for one key (baseline), then one
run enqueued to an idle `keyrotor worker -p 1 -t 8` (measured: from the enqueue until the run's
``finished_at``). The run's time is split into the steps' own wall time (the worker's
``keyrotor_step_duration_seconds`` sum, per step) and the rest: time in the queue between steps
(and the broker's hand-offs). The audit trail's ``state_changed`` events give the timeline.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tests.bench import harness as h
from tests.bench.floor import Floor


def run(stack: ExitStack, workdir: Path, vault: h.Vault, *, trials: int) -> dict[str, Any]:
    h.log(f"[2] single-rotation latency, {trials} trials")
    world = h.build_world(stack, workdir, vault, keys=trials + 1)
    floor = Floor(world)
    floor.prepare(1)
    worker = world.start_worker(processes=1, threads=8)
    # One warm-up rotation: the first run of a fresh worker pays imports and connection set-up.
    warm = world.request(world.keys[-1:], "warm")
    world.enqueue(warm)
    world.wait_finished(warm, timeout=60)
    _wait_idle(worker, time.perf_counter() + 10)
    floor.rotate(0)
    total = h.Figure("end to end (enqueue → last step done)", "ms", baseline_label="floor: 8 calls in sequence")
    visible = h.Figure("  enqueue → run finished_at", "ms")
    steps_fig = h.Figure("  in steps (sum of step durations)", "ms")
    queue_fig = h.Figure("  between steps (queue, hand-offs)", "ms")
    per_step: dict[str, list[float]] = {}
    timelines = []
    for trial in h.iter_trials(trials):
        started = time.perf_counter()
        floor.rotate(0)
        total.baseline.append((time.perf_counter() - started) * 1000)
        ids = world.request([world.keys[trial]], f"lat{trial}")
        m0 = worker.metrics()
        t0, p0 = datetime.now(timezone.utc), time.perf_counter()
        world.enqueue(ids)
        world.wait_finished(ids, timeout=60, poll_s=0.005)  # one run: polling it often costs little
        # The last step may go on after the run's finished_at (notifications): done = the worker idle.
        done = _wait_idle(worker, time.perf_counter() + 30)
        m1 = worker.metrics()
        with world.engine.connect() as c:
            finished = c.execute(sa.text("SELECT finished_at FROM rotation_run WHERE id = :i"), {"i": ids[0]}).scalar_one()
            events = c.execute(sa.text("SELECT at, to_state FROM audit_event WHERE run_id = :i AND event = 'state_changed' "
                                       "ORDER BY id"), {"i": ids[0]}).all()
        e2e = (done - p0) * 1000
        visible.measured.append((finished - t0).total_seconds() * 1000)
        sums = h.diff(_step_sums(m1), _step_sums(m0))
        counts = h.diff(_step_counts(m1), _step_counts(m0))
        in_steps = sum(sums.values()) * 1000
        total.measured.append(e2e)
        steps_fig.measured.append(in_steps)
        queue_fig.measured.append(e2e - in_steps)
        for step, s in sums.items():
            if counts.get(step):
                per_step.setdefault(f"{step} ×{counts[step]}", []).append(s * 1000)
        timelines.append([(round((at - t0).total_seconds() * 1000, 1), state) for at, state in events])
    figures = [total, visible, steps_fig, queue_fig] + [h.Figure(f"    step {name}", "ms", measured=v) for name, v in sorted(per_step.items())]
    h.print_table("2. one rotation alone, end to end", figures)
    print("timeline of the last trial (ms after enqueue → state): "
          + ", ".join(f"{ms:.0f} {state}" for ms, state in timelines[-1]))
    return {"figures": {f.name.strip(): f.as_json() for f in figures}, "timelines": timelines}


def _step_sums(metrics: dict[str, float]) -> dict[str, float]:
    return h.by_label(metrics, "keyrotor_step_duration_seconds_sum", "step")


def _step_counts(metrics: dict[str, float]) -> dict[str, float]:
    return h.by_label(metrics, "keyrotor_step_duration_seconds_count", "step")


def _wait_idle(worker: h.WorkerProcess, deadline: float) -> float:
    """When no message is in flight any more (polled every 5 ms): the moment the last step ended."""
    while time.perf_counter() < deadline:
        now = time.perf_counter()
        if h.metric_sum(worker.metrics(), "keyrotor_messages_in_flight") == 0:
            return now
        time.sleep(0.005)
    raise RuntimeError("the worker did not become idle")
