"""Figure 1: throughput and cost per rotation of ONE `keyrotor worker -p 1 -t 8`.

N keys (KEYROTOR_BENCH_KEYS, default 300), one vault_copy integration each, activation delay and
grace 0. Each trial: the floor (``floor.Floor``: 8 threads making the 8 essential calls per
rotation directly) rotates N keys of its own, then the worker rotates the N inventory keys
(runs created first, then all enqueued at once; timed from the first enqueue until the last run
has ended). Counted per rotation, from outside the worker: its CPU (/proc, whole process tree),
provider requests (stand-in stats), OpenBao requests (audit device), PostgreSQL transactions and
new connections (pg_stat_database), queue messages processed (the worker's own
``keyrotor_message_duration_seconds_count``).
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from tests.bench import harness as h
from tests.bench.floor import ESSENTIAL_CALLS, Floor


def run(stack: ExitStack, workdir: Path, vault: h.Vault, *, keys: int, trials: int, threads: int = 8,
        processes: int = 1) -> dict[str, Any]:
    h.log(f"[1] throughput: {keys} keys, worker -p {processes} -t {threads}, {trials} trials")
    world = h.build_world(stack, workdir, vault, keys=keys)
    floor = Floor(world)
    floor.prepare(keys)
    worker = world.start_worker(processes=processes, threads=threads)
    rate = h.Figure("rotations/s", "rot/s", baseline_label=f"floor: {threads} threads, {ESSENTIAL_CALLS} calls/rotation")
    cpu = h.Figure("CPU per rotation", "ms", baseline_label="floor (this process)")
    http = h.Figure("HTTP calls per rotation", "calls", baseline_label="floor")
    http_provider = h.Figure("  provider requests per rotation", "calls", baseline_label="floor")
    http_vault = h.Figure("  OpenBao requests per rotation", "calls", baseline_label="floor")
    commits = h.Figure("PostgreSQL transactions per rotation", "xacts")
    commits_only = h.Figure("  of which committed", "xacts")
    sessions = h.Figure("new PostgreSQL connections per rotation", "conns")
    tuples = h.Figure("PostgreSQL rows read (returned) per rotation", "rows")
    producer = h.Figure("the bench's own CPU meanwhile, per rotation", "ms")
    messages = h.Figure("queue messages per rotation", "msgs")
    failed: list[int] = []
    problems: list[dict[str, int]] = []
    per_actor: dict[str, float] = {}
    for trial in h.iter_trials(trials):
        # --- baseline: the floor
        p0, v0 = h.provider_counts(world.provider.stats()), vault.requests_seen()
        c0 = time.process_time()
        elapsed = floor.run_pool(threads)
        c1 = time.process_time()
        p1, v1 = h.provider_counts(world.provider.stats()), vault.requests_seen()
        rate.baseline.append(keys / elapsed)
        cpu.baseline.append((c1 - c0) / keys * 1000)
        fp, fv = h.diff(p1, p0)["total"], v1 - v0
        http_provider.baseline.append(fp / keys)
        http_vault.baseline.append(fv / keys)
        http.baseline.append((fp + fv) / keys)
        # --- measured: the worker
        ids = world.request(world.keys, f"t{trial}")
        h.settle()
        poll_rows = world.rows_per_poll(ids)
        polls0 = world.polls
        db0, m0 = world.db.activity(), worker.metrics()
        p0, v0, w0 = h.provider_counts(world.provider.stats()), vault.requests_seen(), worker.cpu_s()
        log_from = worker.log_offset()
        started, own0 = time.perf_counter(), time.process_time()
        world.enqueue(ids)
        states = world.wait_finished(ids, timeout=max(120.0, keys * 2.0))
        elapsed, own1 = time.perf_counter() - started, time.process_time()
        w1 = worker.cpu_s()
        p1, v1 = h.provider_counts(world.provider.stats()), vault.requests_seen()
        h.settle()
        db1, m1 = world.db.activity(), worker.metrics()
        failed.append(sum(1 for s in states.values() if s != "completed"))
        problems.append(worker.log_problems(log_from))
        rate.measured.append(keys / elapsed)
        producer.measured.append((own1 - own0) / keys * 1000)
        cpu.measured.append((w1 - w0) / keys * 1000)
        wp, wv = h.diff(p1, p0)["total"], v1 - v0
        http_provider.measured.append(wp / keys)
        http_vault.measured.append(wv / keys)
        http.measured.append((wp + wv) / keys)
        db = h.diff(db1, db0)
        # Includes the bench's own: creating the runs happened before db0; enqueue reads one run each
        # (one transaction) and the polling of wait_finished (one per 50 ms): both subtracted below.
        # This process's own: one commit for the enqueue, one read (rolled back) per completion poll.
        xacts = db["commits"] - 1 + db["rollbacks"] - (world.polls - polls0)
        commits.measured.append(xacts / keys)
        commits_only.measured.append((db["commits"] - 1) / keys)
        sessions.measured.append(db["sessions"] / keys)
        tuples.measured.append(max(0.0, db["tup_returned"] - (world.polls - polls0) * poll_rows) / keys)
        processed = {k: v for k, v in h.diff(_msgs(m1), _msgs(m0)).items()}
        for actor, n in processed.items():
            per_actor[actor] = per_actor.get(actor, 0.0) + n / keys / trials
        messages.measured.append(sum(processed.values()) / keys)
    commits.note = ("pg_stat_database of the bench database (commits + rollbacks), less this process's enqueue and "
                    "completion polls; statements are not counted (pg_stat_statements is not loaded)")
    tuples.note = "less the rows of this process's completion polls (each measured on the idle database before the trial)"
    producer.note = ("this process (enqueue, completion polls) while the worker runs: CPU the worker could not "
                     "have, on a machine they share")
    messages.note = "by actor: " + ", ".join(f"{a} {n:.2f}" for a, n in sorted(per_actor.items()))
    figures = [rate, cpu, producer, http, http_provider, http_vault, commits, commits_only, sessions, tuples, messages]
    h.print_table(f"1. throughput, {keys} keys, one `keyrotor worker -p {processes} -t {threads}`", figures)
    print(f"failed runs per trial: {failed}; worker log per trial: {problems}")
    return {"keys": keys, "processes": processes, "threads": threads, "failed_runs": failed, "worker_log": problems,
            "essential_calls": ESSENTIAL_CALLS,
            "figures": {f.name.strip(): f.as_json() for f in figures}, "messages_by_actor": per_actor}


def _msgs(metrics: dict[str, float]) -> dict[str, int]:
    return {k: int(v) for k, v in h.by_label(metrics, "keyrotor_message_duration_seconds_count", "actor").items()}
