"""``keyrotor scheduler``: the long-running scheduler process.

The ``keyrotor`` command (``worker.cli.main``) finds this group through the ``keyrotor.commands``
entry point declared in pyproject.toml, so ``worker/`` never imports ``jobs/``.
"""

from __future__ import annotations

import signal
from typing import Any, Optional

import typer

from jobs.scheduler import KeyrotorScheduler, SchedulerConfig
from worker.cli.common import cli_settings, open_database, require_redis, retried_if_dropped, serve_metrics
from worker.log import configure_logging
from worker.notify import notify_function
from worker.ops_metrics import register_scheduler_collectors
from worker.runtime.broker import setup_broker
from worker.pipeline.context import context_from_settings
from worker.redis_conn import redis_client


def scheduler(
    detection_interval: Optional[float] = typer.Option(None, "--detection-interval", help="Seconds between detection passes [KEYROTOR_SCHEDULER_DETECTION_INTERVAL_S]."),
    reconcile_interval: Optional[float] = typer.Option(None, "--reconcile-interval", help="Seconds between stuck-run passes [KEYROTOR_SCHEDULER_RECONCILE_INTERVAL_S]."),
    retirement_interval: Optional[float] = typer.Option(None, "--retirement-interval", help="Seconds between retirement passes [KEYROTOR_SCHEDULER_RETIREMENT_INTERVAL_S]."),
    orphan_interval: Optional[float] = typer.Option(None, "--orphan-interval", help="Seconds between orphan scans [KEYROTOR_SCHEDULER_ORPHAN_INTERVAL_S]."),
    reminder_interval: Optional[float] = typer.Option(None, "--reminder-interval", help="Seconds between reminder passes [KEYROTOR_SCHEDULER_REMINDER_INTERVAL_S]."),
    liveness_interval: Optional[float] = typer.Option(None, "--liveness-interval", min=1, help="Seconds between liveness passes (a few keys checked at their provider) [KEYROTOR_SCHEDULER_LIVENESS_INTERVAL_S]."),
    lock_ttl: Optional[float] = typer.Option(None, "--lock-ttl", min=1, help="Leader lock TTL in seconds [KEYROTOR_SCHEDULER_LOCK_TTL_S]."),
) -> None:
    """Run the detection, reconciliation and retirement jobs; one scheduler acts at a time."""
    settings = cli_settings()
    configure_logging(settings.log_level, settings.log_format)  # a service: JSON lines on stdout
    engine = retried_if_dropped(lambda: open_database(settings))
    require_redis(settings.redis_url)  # the leader lock lives there: say so now, not once a second
    setup_broker(settings)
    config = SchedulerConfig.from_settings(
        settings, detection_s=detection_interval, reconcile_s=reconcile_interval, retirement_s=retirement_interval,
        orphans_s=orphan_interval, reminders_s=reminder_interval, liveness_s=liveness_interval, lock_ttl_s=lock_ttl)
    if settings.metrics_port_for("scheduler"):
        register_scheduler_collectors(settings, engine)  # queue depth and per-key expiry, read per scrape
        serve_metrics(settings, "scheduler")
    sched = KeyrotorScheduler(engine, redis_client(settings.redis_url, socket_timeout=5), config,
                              notify=notify_function(engine, settings),
                              deposit_context=lambda: context_from_settings(settings))

    def _stop(signum: int, _frame: Any) -> None:
        sched.shutdown(release=True)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    sched.start()
    sched.wait()


def register(app: typer.Typer) -> None:
    app.command("scheduler")(scheduler)
