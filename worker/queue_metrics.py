"""Queue depth read from Redis when Prometheus scrapes (registered by ``keyrotor scheduler``).

Why at scrape time, in the scheduler: the numbers live in Redis, so reading them when asked is
always current and needs no job or cache (nothing goes stale when the scheduler leader changes);
the reads are O(1) per queue (LLEN/HLEN/ZCARD, one LINDEX+HGET for the oldest message) in one
pipeline with a short socket timeout, so a slow Redis costs one scrape, never a job. The scheduler
serves one registry per pod (the worker serves the multiprocess sum of its children, where a
custom collector cannot live). Every scheduler replica reports the same values: aggregate with
``max by (queue)``. When Redis does not answer (worker/scrape_metrics.py) these series are left
out of that scrape and ``keyrotor_collector_up{collector="queues"}`` is 0.

Dramatiq's Redis layout (``<ns>`` = ``KEYROTOR_QUEUE_NAMESPACE``): ``<ns>:<queue>`` list of
message ids waiting for a worker, ``<ns>:<queue>.msgs`` hash of those plus the ones workers hold
unacknowledged, the same pair for the delay queue ``<queue>.DQ``, and the dead-letter sorted set
``<ns>:<queue>.XQ``. keyrotor's delayed messages (retries waiting out their backoff, polls, retire
after grace) wait in ``<ns>:<queue>.delayed`` instead (worker/runtime/delayed.py); "delayed"
counts both.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Iterable

from prometheus_client.core import GaugeMetricFamily

from worker.queues import REQUEST_QUEUE, STEP_QUEUE, delayed_keys

QUEUES = (STEP_QUEUE, REQUEST_QUEUE)


def queue_keys(namespace: str, queue: str) -> dict[str, str]:
    """The Redis keys Dramatiq's Redis broker keeps for ``queue`` (KEDA's listName is ``ready``)."""
    base = f"{namespace}:{queue}"
    return {"ready": base, "msgs": f"{base}.msgs", "delayed_msgs": f"{base}.DQ.msgs",
            "delayed_in_redis": delayed_keys(namespace, queue)[0], "dead": f"{base}.XQ"}


class QueueCollector:
    """``keyrotor_queue_messages{queue,state}`` and ``keyrotor_queue_oldest_message_age_seconds``
    (a ``ScrapeSource`` of worker/scrape_metrics.py)."""

    name = "queues"

    def __init__(self, redis_client: Any, namespace: str, queues: Iterable[str] = QUEUES,
                 clock: Callable[[], float] = time.time) -> None:
        self._redis = redis_client
        self._namespace = namespace
        self._queues = tuple(queues)
        self._clock = clock

    @staticmethod
    def families() -> list[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "keyrotor_queue_messages",
            "Messages in a Dramatiq queue by state: ready (waiting for a worker), unacked (held by a "
            "worker), delayed (waiting out a retry backoff or not_before), dead (dead-lettered, kept 7 days).",
            labels=["queue", "state"])
        age = GaugeMetricFamily(
            "keyrotor_queue_oldest_message_age_seconds",
            "Age of the oldest message waiting for a worker (since it was first sent; 0 when none waits).",
            labels=["queue"])
        return [depth, age]

    def read(self) -> list[GaugeMetricFamily]:
        pipe = self._redis.pipeline(transaction=False)
        for queue in self._queues:
            keys = queue_keys(self._namespace, queue)
            pipe.llen(keys["ready"])
            pipe.hlen(keys["msgs"])
            pipe.hlen(keys["delayed_msgs"])
            pipe.zcard(keys["delayed_in_redis"])
            pipe.zcard(keys["dead"])
            pipe.lindex(keys["ready"], 0)  # dramatiq RPUSHes and takes from the left: the oldest
        answers = pipe.execute()
        depth, age = self.families()
        heads = []
        for i, queue in enumerate(self._queues):
            ready, held, delayed, delayed_in_redis, dead, head = answers[6 * i:6 * i + 6]
            depth.add_metric([queue, "ready"], ready)
            depth.add_metric([queue, "unacked"], max(0, held - ready))
            depth.add_metric([queue, "delayed"], delayed + delayed_in_redis)
            depth.add_metric([queue, "dead"], dead)
            heads.append(head)
        pipe = self._redis.pipeline(transaction=False)
        waiting = [(queue, head) for queue, head in zip(self._queues, heads) if head is not None]
        for queue, head in waiting:
            pipe.hget(queue_keys(self._namespace, queue)["msgs"], head)
        bodies = dict(zip((queue for queue, _ in waiting), pipe.execute() if waiting else []))
        now_ms = self._clock() * 1000
        for queue in self._queues:
            sent_ms = _timestamp_ms(bodies[queue], now_ms) if queue in bodies else now_ms
            age.add_metric([queue], max(0.0, (now_ms - sent_ms) / 1000))
        return [depth, age]


def _timestamp_ms(body: Any, default: float) -> float:
    """``message_timestamp`` (ms) of an encoded Dramatiq message; ``default`` if unreadable."""
    if not body:
        return default
    try:
        return float(json.loads(body)["message_timestamp"])
    except (ValueError, KeyError, TypeError):
        return default
