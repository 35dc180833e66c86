"""Detection query cost on PostgreSQL: 100,000 keys, 100 of them due.

The detection scan must cost O(keys due), not O(keys). This measures the real query of
``worker.service.detection.due_keys_query`` with ``ix_managed_key_next_due_at`` and, in the same run and on
the same data, with that index dropped (inside a transaction that is rolled back) as the full-scan
baseline; prints both medians and their ratio, and checks EXPLAIN uses the index.

Run: ``make bench`` or ``pytest tests/bench/bench_detection.py -m bench -s``.
"""

from __future__ import annotations

import statistics
import time
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from worker.service.detection import due_keys_query

pytestmark = [pytest.mark.bench, pytest.mark.integration]

KEYS = 100_000
DUE = 100
REPEATS = 25


def _load(conn: sa.Connection, now: datetime) -> None:
    conn.execute(sa.text("INSERT INTO provider (name, kind, mode, spec, updated_at) VALUES ('bench', 'http', 'overlap', '{}', :now)"), {"now": now})
    # DUE keys overdue by 1..DUE minutes; the rest due over the next two years.
    conn.execute(sa.text("""
        INSERT INTO managed_key (name, provider, credential_type, owner, vault_mount, vault_path, vault_field,
                                 expiry_lead_time_s, max_age_s, grace_period_s, integrations, labels, enabled,
                                 next_due_at, due_reason, created_at, updated_at)
        SELECT 'bench/key-' || g, 'bench', 'api_key', 'bench@example.com', 'secret', 'bench/' || g, 'api_key',
               604800, 7776000, 3600, '[]', '{}', true,
               CASE WHEN g <= :due THEN CAST(:now AS timestamptz) - g * interval '1 minute'
                    ELSE CAST(:now AS timestamptz) + (g * 631) % 63072000 * interval '1 second' + interval '1 hour' END,
               CASE WHEN g % 2 = 0 THEN 'expiry' ELSE 'max_age' END, CAST(:now AS timestamptz), CAST(:now AS timestamptz)
        FROM generate_series(1, :keys) AS g
    """), {"now": now, "due": DUE, "keys": KEYS})
    # Some history, so the NOT EXISTS probe on rotation_run has rows to look at.
    conn.execute(sa.text("""
        INSERT INTO rotation_run (id, key_id, state, mode, trigger, reason, requested_by, emergency, attempts,
                                  created_at, updated_at, finished_at)
        SELECT 'hist-' || id, id, 'completed', 'overlap', 'schedule', 'max_age', 'scheduler', false, 0,
               CAST(:now AS timestamptz) - interval '100 days', CAST(:now AS timestamptz) - interval '100 days',
               CAST(:now AS timestamptz) - interval '100 days'
        FROM managed_key WHERE id % 10 = 0
    """), {"now": now})
    conn.execute(sa.text("ANALYZE managed_key"))
    conn.execute(sa.text("ANALYZE rotation_run"))


def _exec_ms(explain: str) -> float:
    line = next(line for line in explain.splitlines() if line.startswith("Execution Time:"))
    return float(line.split(":")[1].strip().split()[0])


def _time(conn: sa.Connection, sql: str) -> tuple[float, int]:
    timings, rows = [], 0
    for _ in range(REPEATS):
        started = time.perf_counter()
        rows = len(conn.execute(sa.text(sql)).all())
        timings.append(time.perf_counter() - started)
    return statistics.median(timings), rows


def test_detection_query_cost_follows_keys_due(pg_url: str) -> None:
    engine = sa.create_engine(pg_url)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    with engine.begin() as conn:
        started = time.perf_counter()
        _load(conn, now)
        load_s = time.perf_counter() - started

    query = due_keys_query(now, batch=500)
    sql = str(query.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True}))
    with engine.connect() as conn:
        plan = "\n".join(r[0] for r in conn.execute(sa.text("EXPLAIN " + sql)))
        conn.execute(sa.text(sql)).all()  # warm
        indexed_s, indexed_rows = _time(conn, sql)
        analyze_indexed = "\n".join(r[0] for r in conn.execute(sa.text("EXPLAIN (ANALYZE, BUFFERS) " + sql)))

    with engine.connect() as conn:  # baseline: same data, index dropped, rolled back afterwards
        tx = conn.begin()
        conn.execute(sa.text("DROP INDEX ix_managed_key_next_due_at"))
        baseline_plan = "\n".join(r[0] for r in conn.execute(sa.text("EXPLAIN " + sql)))
        conn.execute(sa.text(sql)).all()
        full_s, full_rows = _time(conn, sql)
        analyze_full = "\n".join(r[0] for r in conn.execute(sa.text("EXPLAIN (ANALYZE, BUFFERS) " + sql)))
        tx.rollback()
    engine.dispose()

    print(f"\n--- detection query, PostgreSQL, {KEYS:,} keys, {DUE} due (loaded in {load_s:.1f}s) ---")
    print(plan)
    server_indexed, server_full = _exec_ms(analyze_indexed), _exec_ms(analyze_full)
    print(f"with ix_managed_key_next_due_at : median {indexed_s * 1000:8.3f} ms over {REPEATS} runs, {indexed_rows} rows")
    print(f"without the index (full scan)   : median {full_s * 1000:8.3f} ms over {REPEATS} runs, {full_rows} rows")
    print(f"ratio full-scan / indexed       : {full_s / indexed_s:6.1f}x (client side, incl. round trip and 100 rows)")
    print(f"server execution (EXPLAIN ANALYZE): indexed {server_indexed:.3f} ms, full scan {server_full:.3f} ms, "
          f"ratio {server_full / server_indexed:.0f}x")

    assert indexed_rows == full_rows == DUE
    assert "ix_managed_key_next_due_at" in plan, plan
    assert "Seq Scan on managed_key" not in plan, plan
    assert "Seq Scan on managed_key" in baseline_plan, baseline_plan
    assert indexed_s * 5 < full_s, (indexed_s, full_s)   # O(due) vs O(keys): far apart at 1,000:1
