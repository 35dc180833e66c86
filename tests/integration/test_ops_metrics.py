"""Operations metrics on real services: queue depth (ready/unacked/delayed/dead, oldest message
age) read from a real Redis with Dramatiq's layout, the Dramatiq message-metrics middleware on a
real RedisBroker and worker, per-key expiry/due series with the cardinality cap on SQLite and
PostgreSQL, and the PostgreSQL pool settings (application_name, sizes, prepared statements)."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import dramatiq
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import text

from worker.clock import utcnow
from worker.db.models import ManagedKey, ProviderRecord, RotationRun
from worker.protocol.states import RunState
from worker.db.session import make_engine, session_scope
from worker.key_metrics import KeyCollector
from worker.runtime.broker import make_redis_broker
from worker.runtime.message_metrics import (MESSAGES_DEAD_LETTERED, MESSAGES_IN_FLIGHT, MESSAGES_PROCESSED,
                                             MESSAGES_RETRIED, MessageMetrics, WORKER_THREADS)
from worker.queue_metrics import QueueCollector
from worker.scrape_metrics import ScrapeTimeCollector
from worker.settings import load_settings

pytestmark = pytest.mark.integration


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def collected(*sources: Any) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(ScrapeTimeCollector(sources))
    return registry


def wait_until(predicate: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


# ------------------------------------------------------------------------------ queues
def test_queue_depth_delayed_dead_and_age_from_real_redis(redis_url: str, redis_namespace: str, redis_client: Any) -> None:
    broker = make_redis_broker(redis_url, redis_namespace)
    broker.add_middleware(MessageMetrics())
    calls: list[int] = []

    @dramatiq.actor(broker=broker, queue_name="rotation", actor_name="kr_test_ok", max_retries=0)
    def ok(n: int) -> None:
        calls.append(n)

    @dramatiq.actor(broker=broker, queue_name="rotation", actor_name="kr_test_boom", max_retries=1,
                    min_backoff=10, max_backoff=20)
    def boom() -> None:
        raise RuntimeError("always fails")

    for n in range(3):
        ok.send(n)
    boom.send()
    ok.send_with_options(args=(99,), delay=3_600_000)  # an hour away: stays delayed
    collector = QueueCollector(redis_client, redis_namespace, clock=lambda: time.time() + 120)
    reg = collected(collector)
    assert sample(reg, "keyrotor_collector_up", collector="queues") == 1
    assert sample(reg, "keyrotor_queue_messages", queue="rotation", state="ready") == 4
    assert sample(reg, "keyrotor_queue_messages", queue="rotation", state="delayed") == 1
    assert sample(reg, "keyrotor_queue_messages", queue="rotation", state="dead") == 0
    assert sample(reg, "keyrotor_queue_messages", queue="rotation_requests", state="ready") == 0
    assert 119 <= sample(reg, "keyrotor_queue_oldest_message_age_seconds", queue="rotation") < 200
    assert sample(reg, "keyrotor_queue_oldest_message_age_seconds", queue="rotation_requests") == 0

    before = {
        "ok": sample_metric(MESSAGES_PROCESSED, "rotation", "kr_test_ok", "ok"),
        "err": sample_metric(MESSAGES_PROCESSED, "rotation", "kr_test_boom", "error"),
        "retried": sample_metric(MESSAGES_RETRIED, "rotation", "kr_test_boom"),
        "dead": sample_metric(MESSAGES_DEAD_LETTERED, "rotation", "kr_test_boom"),
        "threads": WORKER_THREADS._value.get(),
    }
    worker = dramatiq.Worker(broker, queues={"rotation"}, worker_threads=2, worker_timeout=100)
    worker.start()
    try:
        assert WORKER_THREADS._value.get() == before["threads"] + 2
        wait_until(lambda: redis_client.zcard(f"{redis_namespace}:rotation.XQ") == 1 and len(calls) == 3)
        wait_until(lambda: sample(collected(collector), "keyrotor_queue_messages", queue="rotation", state="ready") == 0)
        reg = collected(collector)
        assert sample(reg, "keyrotor_queue_messages", queue="rotation", state="dead") == 1
        assert sample(reg, "keyrotor_queue_oldest_message_age_seconds", queue="rotation") == 0
        # The delayed message waits in Redis (not in the worker), still counted.
        assert sample(reg, "keyrotor_queue_messages", queue="rotation", state="delayed") == 1
    finally:
        worker.stop()
    assert WORKER_THREADS._value.get() == before["threads"]
    assert sample_metric(MESSAGES_PROCESSED, "rotation", "kr_test_ok", "ok") == before["ok"] + 3
    assert sample_metric(MESSAGES_PROCESSED, "rotation", "kr_test_boom", "error") == before["err"] + 2  # first try + 1 retry
    assert sample_metric(MESSAGES_RETRIED, "rotation", "kr_test_boom") == before["retried"] + 1
    assert sample_metric(MESSAGES_DEAD_LETTERED, "rotation", "kr_test_boom") == before["dead"] + 1
    assert MESSAGES_IN_FLIGHT.labels("rotation", "kr_test_ok")._value.get() == 0
    broker.close()


def sample_metric(metric: Any, *labels: str) -> float:
    return float(metric.labels(*labels)._value.get())


def test_redis_down_costs_only_the_queue_series(sqlite_url: str, redis_url: str) -> None:
    """One scrape-time source down: its series are left out, keyrotor_collector_up says which,
    and the other source's series are still served (register_scheduler_collectors wiring)."""
    import redis

    from worker.ops_metrics import register_scheduler_collectors

    engine = make_engine(sqlite_url)
    settings = load_settings(database_url=sqlite_url, redis_url=redis_url, metrics_collect_timeout_s=0.2)
    down = redis.Redis(host="127.0.0.1", port=1, socket_timeout=0.2, socket_connect_timeout=0.2)
    reg = CollectorRegistry()
    register_scheduler_collectors(settings, engine, registry=reg, redis_client=down)
    assert sample(reg, "keyrotor_collector_up", collector="queues") == 0
    assert sample(reg, "keyrotor_queue_messages", queue="rotation", state="ready") is None
    assert sample(reg, "keyrotor_collector_up", collector="keys") == 1
    assert sample(reg, "keyrotor_key_series_omitted") == 0

    reg = CollectorRegistry()
    register_scheduler_collectors(settings, engine, registry=reg)  # its own client, from the settings
    assert sample(reg, "keyrotor_collector_up", collector="queues") == 1
    engine.dispose()


# ------------------------------------------------------------------------------ keys
def test_key_series_are_capped_to_the_soonest_due(db_url: str) -> None:
    engine = make_engine(db_url)
    now = utcnow()
    with session_scope(engine) as s:
        s.add(ProviderRecord(name="alloy", kind="http", spec={}))
        s.flush()
        rows = {
            "soon": dict(next_due_at=now + timedelta(days=1), expires_at=now + timedelta(days=5)),
            "overdue": dict(next_due_at=now - timedelta(hours=2), expires_at=now + timedelta(days=2),
                            last_rotated_at=now - timedelta(days=80)),
            "later": dict(next_due_at=now + timedelta(days=40)),
            "never": dict(),
            "off": dict(next_due_at=now - timedelta(days=9), enabled=False),
        }
        keys = {}
        for name, extra in rows.items():
            keys[name] = ManagedKey(name=name, provider="alloy", credential_type="api_key", owner="o",
                                    vault_path=f"apps/{name}", **extra)
            s.add(keys[name])
        s.flush()
        s.add(RotationRun(id="run-overdue", key_id=keys["overdue"].id, state=RunState.issued, trigger="schedule",
                          requested_by="scheduler", created_at=now))
    reg = collected(KeyCollector(engine, max_series=2, clock=lambda: now))
    assert sample(reg, "keyrotor_collector_up", collector="keys") == 1
    assert sample(reg, "keyrotor_managed_keys", provider="alloy") == 4  # the disabled key is not managed
    assert sample(reg, "keyrotor_key_series_omitted") == 2
    assert sample(reg, "keyrotor_key_due_in_seconds", key="overdue", provider="alloy") == pytest.approx(-7200)
    assert sample(reg, "keyrotor_key_expires_in_seconds", key="soon", provider="alloy") == pytest.approx(5 * 86400)
    assert sample(reg, "keyrotor_key_last_rotation_timestamp_seconds", key="overdue", provider="alloy") == pytest.approx(
        (now - timedelta(days=80)).timestamp())
    assert sample(reg, "keyrotor_key_rotation_open", key="overdue", provider="alloy") == 1
    assert sample(reg, "keyrotor_key_rotation_open", key="soon", provider="alloy") == 0
    assert sample(reg, "keyrotor_key_due_in_seconds", key="later", provider="alloy") is None  # beyond the cap
    assert sample(reg, "keyrotor_key_due_in_seconds", key="off", provider="alloy") is None

    everything = collected(KeyCollector(engine, max_series=100, clock=lambda: now))
    assert sample(everything, "keyrotor_key_series_omitted") == 0
    assert sample(everything, "keyrotor_key_rotation_open", key="never", provider="alloy") == 0
    assert sample(everything, "keyrotor_key_due_in_seconds", key="never", provider="alloy") is None
    engine.dispose()


def test_key_collector_reports_an_unreachable_database() -> None:
    engine = make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none", connect_args={"connect_timeout": 1})
    reg = collected(KeyCollector(engine, max_series=10))
    assert sample(reg, "keyrotor_collector_up", collector="keys") == 0
    assert sample(reg, "keyrotor_managed_keys", provider="alloy") is None


# ------------------------------------------------------------------------------ database pool
def test_postgres_pool_settings_and_application_name(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.db.session import postgres_engine_options

    settings = load_settings(database_url=pg_url, db_pool_size=3, db_max_overflow=1, db_pool_timeout_s=7,
                             db_application_name="keyrotor-worker", db_prepared_statements=False)
    options = postgres_engine_options(settings=settings)
    engine = make_engine(settings.database_url, **options)
    try:
        assert (engine.pool.size(), engine.pool._max_overflow, engine.pool._timeout) == (3, 1, 7)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT current_setting('application_name')")).scalar() == "keyrotor-worker"
            assert conn.connection.dbapi_connection.prepare_threshold is None
    finally:
        engine.dispose()

    # Without explicit options make_engine takes them from the process settings (KEYROTOR_DB_*).
    from worker.settings import get_settings

    monkeypatch.setenv("KEYROTOR_DB_POOL_SIZE", "4")
    monkeypatch.setenv("KEYROTOR_DB_APPLICATION_NAME", "keyrotor-scheduler")
    get_settings.cache_clear()
    try:
        engine = make_engine(settings.database_url)
        assert engine.pool.size() == 4
        with engine.connect() as conn:
            assert conn.execute(text("SELECT current_setting('application_name')")).scalar() == "keyrotor-scheduler"
            assert conn.connection.dbapi_connection.prepare_threshold is not None  # default: psycopg prepares
        engine.dispose()
    finally:
        get_settings.cache_clear()


# ------------------------------------------------------------------------------ scheduler passes
def test_a_leader_pass_records_its_success_time(sqlite_url: str, redis_url: str, redis_namespace: str) -> None:
    import redis

    from jobs.scheduler import KeyrotorScheduler, SchedulerConfig
    from worker.ops_metrics import SCHEDULER_JOB_LAST_SUCCESS

    engine = make_engine(sqlite_url)
    sched = KeyrotorScheduler(engine, redis.Redis.from_url(redis_url), SchedulerConfig(lock_name=f"{redis_namespace}:leader"),
                              notify=lambda *a, **k: None)
    gauge = SCHEDULER_JOB_LAST_SUCCESS.labels("reminders")
    gauge.set(0)
    sched._guarded("reminders")  # not the leader: nothing runs, nothing recorded
    assert gauge._value.get() == 0
    assert sched.lock.tick()
    before = time.time()
    sched._guarded("reminders")
    assert sched.passes["reminders"] == 1
    assert before <= gauge._value.get() <= time.time()
    sched.lock.release()
    engine.dispose()
