"""Dramatiq message metrics in keyrotor's own registry (served on the worker's /metrics).

``dramatiq.middleware.Prometheus`` would start a second HTTP server with its own multiprocess
directory; this middleware records the same facts with prometheus-client metrics that our
``/metrics`` already serves (summed over the worker processes in multiprocess mode).

Labels are the queue and actor names only (a handful of values): never a message id, run id or
key. A message's outcome is ``ok`` or ``error`` (the step raised: it is then retried, or
dead-lettered once its retries are spent).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import dramatiq
from prometheus_client import Counter, Gauge, Histogram

MESSAGES_PROCESSED = Counter(
    "keyrotor_messages_processed_total",
    "Queue messages a worker finished processing, by queue, actor and outcome (ok/error/skipped).",
    ["queue", "actor", "outcome"],
)
MESSAGES_RETRIED = Counter(
    "keyrotor_messages_retried_total",
    "Queue messages re-enqueued for a retry after an error, by queue and actor.",
    ["queue", "actor"],
)
MESSAGES_DEAD_LETTERED = Counter(
    "keyrotor_messages_dead_lettered_total",
    "Queue messages moved to the dead-letter queue (<queue>.XQ), by queue and actor.",
    ["queue", "actor"],
)
MESSAGES_IN_FLIGHT = Gauge(
    "keyrotor_messages_in_flight",
    "Queue messages being processed right now, by queue and actor.",
    ["queue", "actor"],
    multiprocess_mode="livesum",
)
MESSAGE_DURATION = Histogram(
    "keyrotor_message_duration_seconds",
    "Wall time of processing one queue message, by queue and actor.",
    ["queue", "actor"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
)
WORKER_THREADS = Gauge(
    "keyrotor_worker_threads",
    "Worker threads consuming the queues (0 or absent: no worker is running).",
    multiprocess_mode="livesum",
)


def _canonical(queue_name: str) -> str:
    # A delayed message is processed from "<queue>.DQ"; report it under its queue.
    return queue_name[:-3] if queue_name.endswith(".DQ") else queue_name


class MessageMetrics(dramatiq.Middleware):
    """Counts processed/failed/retried/dead-lettered messages, in-flight messages and durations."""

    def __init__(self) -> None:
        self._started: dict[str, float] = {}
        self._lock = threading.Lock()

    def after_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        WORKER_THREADS.inc(getattr(worker, "worker_threads", 1))

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        WORKER_THREADS.dec(getattr(worker, "worker_threads", 1))

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        MESSAGES_IN_FLIGHT.labels(_canonical(message.queue_name), message.actor_name).inc()
        with self._lock:
            self._started[message.message_id] = time.monotonic()

    def after_process_message(self, broker: dramatiq.Broker, message: Any, *, result: Any = None,
                              exception: BaseException | None = None) -> None:
        self._finish(message, "ok" if exception is None else "error")

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        self._finish(message, "skipped")

    def after_enqueue(self, broker: dramatiq.Broker, message: Any, delay: Any) -> None:
        # Retries re-enqueue with a backoff delay; a worker moving a delayed message whose time has
        # come to its queue enqueues without one (that is not another retry).
        if delay is not None and message.options.get("retries"):
            MESSAGES_RETRIED.labels(_canonical(message.queue_name), message.actor_name).inc()

    def after_nack(self, broker: dramatiq.Broker, message: Any) -> None:
        MESSAGES_DEAD_LETTERED.labels(_canonical(message.queue_name), message.actor_name).inc()

    def _finish(self, message: Any, outcome: str) -> None:
        queue, actor = _canonical(message.queue_name), message.actor_name
        with self._lock:
            started = self._started.pop(message.message_id, None)
        if started is None:  # skipped before processing began (e.g. too old): never counted in flight
            MESSAGES_PROCESSED.labels(queue, actor, outcome).inc()
            return
        MESSAGES_IN_FLIGHT.labels(queue, actor).dec()
        MESSAGE_DURATION.labels(queue, actor).observe(time.monotonic() - started)
        MESSAGES_PROCESSED.labels(queue, actor, outcome).inc()
