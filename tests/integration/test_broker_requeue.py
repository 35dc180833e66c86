"""Delayed messages a killed worker held in memory go back to live workers on their own (real
Redis), instead of waiting for the reconciler's step deadline."""

from __future__ import annotations

import time
from typing import Any

import dramatiq
import pytest
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import dq_name

from worker.runtime.broker import reset_broker, setup_broker
from worker.queues import STEP_QUEUE
from worker.settings import load_settings

pytestmark = pytest.mark.integration


def test_a_delayed_message_held_by_a_killed_worker_is_delivered_by_a_live_one(
        redis_url: str, redis_namespace: str, redis_client: Any) -> None:
    done_key = f"{redis_namespace}:probe-done"

    def probe(run_id: str) -> None:
        redis_client.rpush(done_key, run_id)

    # The worker that dies: it fetched the delayed message (e.g. "retire after the grace period")
    # and holds it in memory, unacknowledged, until it is due. Then it is SIGKILLed: no more
    # commands, so its heartbeat in Redis stops.
    doomed = RedisBroker(url=redis_url, namespace=redis_namespace)
    sender = dramatiq.actor(probe, actor_name="probe_delayed", queue_name=STEP_QUEUE, broker=doomed)
    sender.send_with_options(args=("run-1",), delay=300)
    consumer = doomed.consume(dq_name(STEP_QUEUE), prefetch=10, timeout=100)
    deadline = time.monotonic() + 5
    while next(consumer) is None:
        assert time.monotonic() < deadline, "the delayed message was never fetched"
    # (no ack, no close: a killed process does neither)

    # A live worker, with the broker built from settings as `keyrotor worker` builds it.
    settings = load_settings(redis_url=redis_url, queue_namespace=redis_namespace, broker_heartbeat_timeout_s=3)
    live = setup_broker(settings)
    dramatiq.actor(probe, actor_name="probe_delayed", queue_name=STEP_QUEUE, broker=live)
    worker = dramatiq.Worker(live, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        # Dramatiq's defaults (60 s heartbeat, maintenance on 0.1% of commands) kept it far longer.
        deadline = time.monotonic() + 20
        while not redis_client.lrange(done_key, 0, -1) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert redis_client.lrange(done_key, 0, -1) == [b"run-1"]
    finally:
        worker.stop()
        live.close()
        reset_broker()
        doomed.close()
