"""Operations metrics beside worker/metrics.py: build info, scheduler pass times, and the
scrape-time queue and key collectors the scheduler registers.

Alerts (config/prometheus/keyrotor-rules.yaml) and the Grafana dashboard (config/grafana/) use
these names; tests/integration/test_observability.py checks that every name they use is exported.
"""

from __future__ import annotations

import platform
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Gauge
from sqlalchemy.engine import Engine

from worker import __version__
from worker.key_metrics import KeyCollector
from worker.queue_metrics import QueueCollector
from worker.redis_conn import redis_client as make_redis_client
from worker.scrape_metrics import ScrapeTimeCollector

BUILD_INFO = Gauge(
    "keyrotor_build_info",
    "Always 1; the labels say which keyrotor and Python are running.",
    ["version", "python"],
    multiprocess_mode="max",
)
BUILD_INFO.labels(__version__, platform.python_version()).set(1)

SCHEDULER_JOB_LAST_SUCCESS = Gauge(
    "keyrotor_scheduler_job_last_success_timestamp_seconds",
    "Unix time the scheduler leader last finished a pass of a job (detection, reconcile, ...).",
    ["scheduler_job"],  # not "job": Prometheus owns that label (the scrape job)
)


def job_succeeded(job: str) -> None:
    SCHEDULER_JOB_LAST_SUCCESS.labels(job).set_to_current_time()


def register_scheduler_collectors(settings: Any, engine: Engine, *, registry: CollectorRegistry = REGISTRY,
                                  redis_client: Any = None) -> Any:
    """Register the queue-depth and per-key collectors (the scheduler's /metrics); returns the
    registered collector."""
    timeout = settings.metrics_collect_timeout_s
    if redis_client is None:
        redis_client = make_redis_client(settings.redis_url, socket_timeout=timeout)
    collector = ScrapeTimeCollector([QueueCollector(redis_client, settings.queue_namespace),
                                     KeyCollector(engine, max_series=settings.metrics_max_key_series, timeout_s=timeout)])
    registry.register(collector)
    return collector
