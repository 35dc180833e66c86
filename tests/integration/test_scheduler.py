"""Two schedulers against one Redis and one PostgreSQL: one acts, each due key gets one run, and
the lock is handed over within its TTL when the holder dies (SIGKILL) or stops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

import pytest
import redis
from sqlmodel import select

from jobs.scheduler import KeyrotorScheduler, SchedulerConfig
from tests.scheduler_fakes import ALLOY_SPEC, RecordingPipeline, add_key, add_provider
from worker.db.models import ProviderRecord, RotationRun
from worker.db.session import make_engine, session_scope

pytestmark = pytest.mark.integration

TTL = 2.0


class NoListing:
    can_list = False
    can_revoke = False


def _config(ns: str, **overrides: Any) -> SchedulerConfig:
    values: dict[str, Any] = dict(detection_s=0.3, reconcile_s=60, retirement_s=60, orphans_s=600, reminders_s=600,
                                  lock_ttl_s=TTL, lock_name=f"{ns}:scheduler:leader")
    values.update(overrides)
    return SchedulerConfig(**values)


def _seed(url: str, names: list[str], due: datetime) -> None:
    engine = make_engine(url)
    with session_scope(engine) as s:
        if s.get(ProviderRecord, "alloy") is None:
            add_provider(s, "alloy", ALLOY_SPEC)
            s.flush()
        for name in names:
            add_key(s, name, "alloy", next_due_at=due, due_reason="expiry")
    engine.dispose()


def _runs_by_key(url: str) -> dict[int, int]:
    engine = make_engine(url)
    with session_scope(engine) as s:
        runs = s.exec(select(RotationRun)).all()
    engine.dispose()
    counts: dict[int, int] = {}
    for run in runs:
        counts[run.key_id] = counts.get(run.key_id, 0) + 1
    return counts


def _wait_for(predicate: Callable[[], bool], timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout}s")


def _scheduler(url: str, redis_url: str, ns: str, pipeline: RecordingPipeline, token: str) -> KeyrotorScheduler:
    return KeyrotorScheduler(make_engine(url), redis.Redis.from_url(redis_url), _config(ns), pipeline=pipeline.as_pipeline(),
                             provider_factory=lambda _r: NoListing(), notify=lambda *a, **k: None, token=token)


def test_two_schedulers_make_one_run_per_due_key_and_hand_over_when_the_holder_dies(pg_url, redis_url, redis_namespace) -> None:  # type: ignore[no-untyped-def]
    now = datetime.now(timezone.utc)
    _seed(pg_url, [f"alloy/k{i:02d}" for i in range(30)], now - timedelta(minutes=5))
    pipes = {"a": RecordingPipeline(), "b": RecordingPipeline()}
    a = _scheduler(pg_url, redis_url, redis_namespace, pipes["a"], "sched-a")
    b = _scheduler(pg_url, redis_url, redis_namespace, pipes["b"], "sched-b")
    a.start()
    b.start()
    try:
        _wait_for(lambda: len(_runs_by_key(pg_url)) == 30, timeout=10)
        time.sleep(1.0)  # several more detection intervals on both
        counts = _runs_by_key(pg_url)
        assert len(counts) == 30 and set(counts.values()) == {1}
        leader, standby = (a, b) if a.lock.is_leader else (b, a)
        assert not standby.lock.is_leader
        assert leader.passes["detection"] >= 2 and standby.passes["detection"] == 0
        assert len(pipes["a"].enqueued) + len(pipes["b"].enqueued) == 30

        # The holder dies: no more renewals, no release (what SIGKILL does to a process).
        leader.shutdown(release=False)
        died = time.monotonic()
        handover = _wait_for(lambda: standby.lock.is_leader, timeout=TTL + 3)
        bound = TTL + standby.config.lock_tick_s + 0.3
        print(f"\nhandover after the holder stopped renewing: {handover:.2f}s (lock TTL {TTL}s)")
        assert handover <= bound

        # The new leader acts: new due keys get their run.
        _seed(pg_url, ["alloy/new1", "alloy/new2"], datetime.now(timezone.utc) - timedelta(seconds=1))
        _wait_for(lambda: len(_runs_by_key(pg_url)) == 32, timeout=5)
        assert set(_runs_by_key(pg_url).values()) == {1}
        assert time.monotonic() - died < 10
    finally:
        a.shutdown()
        b.shutdown()


def test_graceful_stop_hands_over_at_once(pg_url, redis_url, redis_namespace) -> None:  # type: ignore[no-untyped-def]
    a = _scheduler(pg_url, redis_url, redis_namespace, RecordingPipeline(), "sched-a")
    b = _scheduler(pg_url, redis_url, redis_namespace, RecordingPipeline(), "sched-b")
    a.start()
    _wait_for(lambda: a.lock.is_leader, timeout=3)
    b.start()
    try:
        time.sleep(0.6)
        assert not b.lock.is_leader
        a.shutdown()  # releases the lock
        handover = _wait_for(lambda: b.lock.is_leader, timeout=TTL)
        assert handover <= b.config.lock_tick_s + 0.3
    finally:
        a.shutdown()
        b.shutdown()


def _first_line_with(stream: Any, word: str) -> bool:
    for _ in range(50):  # structlog's default console lines may come first
        line = stream.readline()
        if not line:
            return False
        if line.strip() == word:
            return True
    return False


HOLDER = textwrap.dedent("""
    import sys, time, redis
    from jobs.leader import LeaderLock
    lock = LeaderLock(redis.Redis.from_url(sys.argv[1]), sys.argv[2], float(sys.argv[3]), token="subprocess")
    while True:
        if lock.tick():
            sys.stderr.flush()
            print("LEADER", flush=True)
        time.sleep(float(sys.argv[3]) / 4)
""")


def test_sigkill_of_the_lock_holder_process_hands_over_within_the_ttl(pg_url, redis_url, redis_namespace) -> None:  # type: ignore[no-untyped-def]
    lock_name = f"{redis_namespace}:scheduler:leader"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, redis_url, lock_name, str(TTL)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=os.getcwd())
    try:
        assert proc.stdout is not None and _first_line_with(proc.stdout, "LEADER")
        b = _scheduler(pg_url, redis_url, redis_namespace, RecordingPipeline(), "sched-b")
        b.start()
        try:
            time.sleep(0.8)
            assert not b.lock.is_leader  # the subprocess holds it and renews
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
            handover = _wait_for(lambda: b.lock.is_leader, timeout=TTL + 3)
            print(f"\nhandover after SIGKILL of the holder: {handover:.2f}s (lock TTL {TTL}s)")
            assert handover <= TTL + b.config.lock_tick_s + 0.3
        finally:
            b.shutdown()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_two_namespaces_on_one_redis_elect_two_leaders(sqlite_url, redis_url, redis_namespace) -> None:  # type: ignore[no-untyped-def]
    # Two deployments sharing one Redis database under different KEYROTOR_QUEUE_NAMESPACEs: the
    # leader lock lived at a fixed key, so one of them had no acting scheduler at all.
    from worker.settings import load_settings

    schedulers = []
    for deployment in ("blue", "green"):
        settings = load_settings(redis_url=redis_url, database_url=sqlite_url,
                                 queue_namespace=f"{redis_namespace}-{deployment}")
        config = SchedulerConfig.from_settings(settings, detection_s=0.3, lock_ttl_s=TTL)
        schedulers.append(KeyrotorScheduler(make_engine(sqlite_url), redis.Redis.from_url(redis_url), config,
                                            pipeline=RecordingPipeline().as_pipeline(), provider_factory=lambda _r: NoListing(),
                                            notify=lambda *a, **k: None, token=f"sched-{deployment}"))
    for sched in schedulers:
        sched.start()
    try:
        _wait_for(lambda: all(s.lock.is_leader for s in schedulers), timeout=TTL + 3)
        _wait_for(lambda: all(s.passes["detection"] >= 1 for s in schedulers), timeout=5)
    finally:
        for sched in schedulers:
            sched.shutdown()
