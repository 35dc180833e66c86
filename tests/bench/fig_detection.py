"""Figure 4: the scheduler's detection pass (query + request + enqueue) at 10k / 100k / 1M keys, 100 due.

One throw-away database grows to each size in turn (KEYROTOR_BENCH_DETECTION_SIZES, comma
separated), each step one ``INSERT ... SELECT generate_series``; 100 keys overdue, the rest due over
the next two years, one key in ten with a finished run in its history. Each trial times the
scheduler job's own code, ``detect_due`` (what ``jobs.scheduler`` runs every interval: the query,
one run requested per due key, its first message enqueued to Redis), against the bare
``due_keys_query`` on the same data; between trials the runs it created are deleted so that the
same 100 keys are due again. The database is dropped at the end.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tests.bench import harness as h

DUE = 100


def _load(conn: sa.Connection, now: datetime, start: int, stop: int, spec: dict[str, Any]) -> None:
    if start == 1:
        conn.execute(sa.text("INSERT INTO provider (name, kind, mode, spec, updated_at) "
                             "VALUES (:p, 'http', 'overlap', CAST(:spec AS json), :now)"),
                     {"p": h.PROVIDER, "spec": json.dumps(spec), "now": now})
    conn.execute(sa.text("""
        INSERT INTO managed_key (name, provider, credential_type, owner, vault_mount, vault_path, vault_field,
                                 expiry_lead_time_s, max_age_s, grace_period_s, integrations, labels, enabled,
                                 next_due_at, due_reason, created_at, updated_at)
        SELECT 'bench/key-' || g, :p, 'api_key', 'bench@example.com', 'secret', 'bench/' || g, 'api_key',
               604800, 7776000, 0, '["copy"]', '{}', true,
               CASE WHEN g <= :due THEN CAST(:now AS timestamptz) - g * interval '1 minute'
                    ELSE CAST(:now AS timestamptz) + (g * 631) % 63072000 * interval '1 second' + interval '1 hour' END,
               CASE WHEN g % 2 = 0 THEN 'expiry' ELSE 'max_age' END, CAST(:now AS timestamptz), CAST(:now AS timestamptz)
        FROM generate_series(CAST(:start AS int), CAST(:stop AS int)) AS g
    """), {"p": h.PROVIDER, "now": now, "due": DUE, "start": start, "stop": stop})
    conn.execute(sa.text("""
        INSERT INTO rotation_run (id, key_id, state, mode, trigger, reason, requested_by, emergency, attempts, requeues,
                                  created_at, updated_at, finished_at)
        SELECT 'hist-' || id, id, 'completed', 'overlap', 'manual', 'max_age', 'bench', false, 0, 0,
               CAST(:now AS timestamptz) - interval '100 days', CAST(:now AS timestamptz) - interval '100 days',
               CAST(:now AS timestamptz) - interval '100 days'
        FROM managed_key WHERE id % 10 = 0 AND id BETWEEN :start AND :stop
    """), {"now": now, "start": start, "stop": stop})


def _reset(engine: sa.Engine, world_redis: Any, namespace: str) -> None:
    """Forget the runs a pass created (the audit table is append-only: TRUNCATE fires no row
    trigger) and the queue messages it sent, so that the same keys are due again."""
    with engine.begin() as c:
        c.execute(sa.text("DELETE FROM rotation_run WHERE trigger = 'schedule'"))
        c.execute(sa.text("TRUNCATE audit_event"))
    for key in world_redis.scan_iter(match=f"{namespace}*", count=1000):
        if not key.endswith(b"__heartbeats__"):
            world_redis.delete(key)


def run(stack: ExitStack, workdir: Path, *, sizes: list[int], trials: int) -> dict[str, Any]:
    from keyrotor_sandbox.provider import standin_provider_spec
    from worker.log import configure_logging
    from worker.redis_conn import redis_client
    from worker.runtime.broker import make_redis_broker, reset_broker, setup_broker
    from worker.service.detection import detect_due, due_keys_query

    h.log(f"[4] detection + enqueue at {', '.join(f'{s:,}' for s in sizes)} keys, {DUE} due, {trials} trials")
    db = h.create_database(stack)
    namespace = f"krbench-{__import__('uuid').uuid4().hex[:8]}"
    h.redis_cleanup(stack, namespace)
    broker = setup_broker(broker=make_redis_broker(h.REDIS_URL, namespace))
    stack.callback(reset_broker)
    stack.callback(broker.close)
    redis = redis_client(h.REDIS_URL, socket_timeout=10)
    stack.callback(redis.close)
    log_stream = open(workdir / "detection.log", "w")
    stack.callback(log_stream.close)
    configure_logging("INFO", "json", stream=log_stream)  # as the scheduler logs: one line per key requested
    devnull = open(os.devnull, "w")
    stack.callback(devnull.close)
    stack.callback(configure_logging, "WARNING", "json", stream=devnull)  # before log_stream closes (LIFO)
    engine = sa.create_engine(db.url)  # the scheduler's engine has the same pool defaults
    stack.callback(engine.dispose)
    spec = standin_provider_spec("http://127.0.0.1:9", admin_token_ref={"env": h.TOKEN_ENV})
    now = datetime.now(timezone.utc).replace(microsecond=0)
    loaded = 0
    results: dict[str, Any] = {}
    figures = []
    for size in sorted(sizes):
        started = time.perf_counter()
        with engine.begin() as c:
            _load(c, now, loaded + 1, size, spec)
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(sa.text("VACUUM ANALYZE managed_key"))
            c.execute(sa.text("VACUUM ANALYZE rotation_run"))
        h.log(f"  {size:,} keys loaded (+{size - loaded:,} in {time.perf_counter() - started:.1f}s)")
        loaded = size
        fig = h.Figure(f"{size:>9,} keys: detect_due (query+request+enqueue)", "ms", baseline_label="bare due_keys_query")
        server = []
        for _ in h.iter_trials(trials):
            query_now = datetime.now(timezone.utc)
            with engine.connect() as c:
                t = time.perf_counter()
                rows = c.execute(due_keys_query(query_now, batch=500)).all()
                fig.baseline.append((time.perf_counter() - t) * 1000)
                compiled = due_keys_query(query_now, batch=500).compile(dialect=engine.dialect)
                plan = "\n".join(r[0] for r in c.exec_driver_sql("EXPLAIN (ANALYZE) " + str(compiled), compiled.params))
                server.append(float(plan.rsplit("Execution Time:", 1)[1].split()[0]))
            assert len(rows) == DUE, len(rows)
            t = time.perf_counter()
            result = detect_due(engine, now=datetime.now(timezone.utc), batch=500)
            fig.measured.append((time.perf_counter() - t) * 1000)
            assert len(result.requested) == DUE and not result.errors, (len(result.requested), result.errors)
            queued = sum(int(redis.llen(k)) for k in redis.scan_iter(match=f"{namespace}*", count=1000)
                         if redis.type(k) == b"list")
            _reset(engine, redis, namespace)
        fig.note = f"server execution of the query (EXPLAIN ANALYZE): {h.fmt3(server, '.2f')} ms; messages queued: {queued}"
        figures.append(fig)
        results[str(size)] = fig.as_json() | {"query_server_ms": server}
    h.print_table(f"4. detection pass, {DUE} due", figures)
    return {"due": DUE, "sizes": sizes, "figures": results}
