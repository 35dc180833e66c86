"""Figure 3: an emergency over E keys (KEYROTOR_BENCH_EMERGENCY_KEYS, default 300) at a provider limit.

The provider stand-in enforces KEYROTOR_BENCH_RATE_LIMIT requests per second (default 20; sliding
window, 429 with Retry-After beyond it) and the inventory declares the same ``rate_limit``. Two
worker processes (`keyrotor worker -p 2 -t 8`) are idle; each trial runs the operator's command,
`keyrotor rotate --provider bench --all --emergency`, and waits until every emergency run has
ended. The stand-in's counters, sampled every 0.25 s, give the achieved rate of answered
(non-429) requests over the busy phase (first to last request seen), the 429 answers and the
failed runs. Baseline: the limit itself.
"""

from __future__ import annotations

import subprocess
import threading
import time
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tests.bench import harness as h


def run(stack: ExitStack, workdir: Path, vault: h.Vault, *, keys: int, trials: int, limit: int) -> dict[str, Any]:
    h.log(f"[3] emergency: {keys} keys, provider limit {limit}/s, worker -p 2 -t 8, {trials} trials")
    world = h.build_world(stack, workdir, vault, keys=keys, rate_limit=limit)
    worker = world.start_worker(processes=2, threads=8)
    problems: list[dict[str, int]] = []
    achieved = h.Figure("answered provider requests/s, busy phase", "req/s", baseline_label="the provider's limit")
    share = h.Figure("  share of the limit", "%", baseline_label="100 %")
    rejected = h.Figure("429 answers", "answers", baseline_label="0")
    failed = h.Figure("failed runs", "runs", baseline_label="0")
    duration = h.Figure("emergency duration (command → last run ended)", "s",
                        baseline_label="provider calls of the run / limit")
    calls = h.Figure("provider requests per key", "calls")
    for trial in h.iter_trials(trials):
        t0 = datetime.now(timezone.utc)
        log_from = worker.log_offset()
        start = time.perf_counter()
        before = h.provider_counts(world.provider.stats())
        samples: list[tuple[float, dict[str, int]]] = [(time.perf_counter(), before)]
        stop = threading.Event()

        def sample() -> None:  # from before the command starts: its runs may begin before it exits
            while not stop.wait(0.25):
                samples.append((time.perf_counter(), h.provider_counts(world.provider.stats())))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        cli = subprocess.run(h.keyrotor_command("rotate", "--provider", h.PROVIDER, "--all", "--emergency", "--reason", "bench"),
                             env=world.env(), cwd=h.REPO, capture_output=True, text=True, timeout=300)
        if cli.returncode != 0:
            raise RuntimeError(f"emergency command failed ({cli.returncode}): {cli.stderr[-2000:]}")
        deadline = time.monotonic() + max(300.0, keys * 10.0 / limit * 3)
        while True:
            time.sleep(0.25)
            with world.engine.connect() as c:
                row = c.execute(sa.text("SELECT count(*), count(*) FILTER (WHERE finished_at IS NULL), "
                                        "count(*) FILTER (WHERE finished_at IS NOT NULL AND state <> 'completed') "
                                        "FROM rotation_run WHERE trigger = 'emergency' AND created_at >= :t0"), {"t0": t0}).one()
            if row[0] >= keys and row[1] == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"emergency: {row[1]} of {row[0]} runs still open; worker log: "
                                   f"{worker.log_problems(log_from)}")
        ended = time.perf_counter()
        time.sleep(0.5)
        stop.set()
        sampler.join()
        busy = [t for (t, c), (_, prev) in zip(samples[1:], samples) if c["total"] > prev["total"]]
        first = next(t for (t, c), (_, prev) in zip(samples[1:], samples) if c["total"] > prev["total"]) - 0.25
        last = busy[-1]
        total = h.diff(samples[-1][1], before)
        rate = total["answered"] / max(last - first, 1e-9)
        achieved.measured.append(rate)
        achieved.baseline.append(float(limit))
        share.measured.append(rate / limit * 100)
        share.baseline.append(100.0)
        rejected.measured.append(total["429"])
        failed.measured.append(row[2])
        duration.measured.append(ended - start)
        duration.baseline.append(total["answered"] / limit)
        calls.measured.append(total["total"] / keys)
        problems.append(worker.log_problems(log_from))
    h.print_table(f"3. emergency, {keys} keys, limit {limit}/s, `keyrotor worker -p 2 -t 8`", [achieved, share, rejected, failed,
                                                                                                 duration, calls])
    print(f"worker log per trial: {problems}")
    return {"keys": keys, "limit_per_s": limit, "worker_log": problems,
            "figures": {f.name.strip(): f.as_json() for f in (achieved, share, rejected, failed, duration, calls)}}
