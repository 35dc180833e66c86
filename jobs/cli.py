"""``keyrotor scheduler`` (the long-running scheduler process) and ``keyrotor plan``."""

from __future__ import annotations

import math
import signal
from typing import Any, Optional

import typer

from worker.cli.common import cli_settings, fail, open_database, require_redis, serve_metrics
from worker.cli.output import OutputFormat, emit, iso, json_option, output_option, pick_format, print_table, relative
from worker.clock import utcnow
from worker.db.session import session_scope


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
    from jobs.scheduler import KeyrotorScheduler, SchedulerConfig
    from worker.log import configure_logging
    from worker.pipeline.broker import setup_broker
    from worker.redis_conn import redis_client

    settings = cli_settings()
    configure_logging(settings.log_level, settings.log_format)  # a service: JSON lines on stdout
    engine = open_database(settings)
    require_redis(settings.redis_url)  # the leader lock lives there: say so now, not once a second
    setup_broker(settings)
    config = SchedulerConfig.from_settings(
        settings, detection_s=detection_interval, reconcile_s=reconcile_interval, retirement_s=retirement_interval,
        orphans_s=orphan_interval, reminders_s=reminder_interval, liveness_s=liveness_interval, lock_ttl_s=lock_ttl)
    if settings.metrics_port_for("scheduler"):
        from worker.ops_metrics import register_scheduler_collectors

        register_scheduler_collectors(settings, engine)  # queue depth and per-key expiry, read per scrape
        serve_metrics(settings, "scheduler")
    from worker.notify import notify_function
    from worker.pipeline.context import context_from_settings

    sched = KeyrotorScheduler(engine, redis_client(settings.redis_url, socket_timeout=5), config,
                              notify=notify_function(engine, settings),
                              deposit_context=lambda: context_from_settings(settings))

    def _stop(signum: int, _frame: Any) -> None:
        sched.shutdown(release=True)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    sched.start()
    sched.wait()


#: ``plan --days`` upper bound: a century ahead is already far past any key's lifetime.
PLAN_MAX_DAYS = 36_500


def plan(
    days: float = typer.Option(30.0, "--days", min=0, help=f"How far ahead to look (at most {PLAN_MAX_DAYS})."),
    output: Optional[OutputFormat] = output_option(),
    json_out: bool = json_option(),
) -> None:
    """What will rotate when, and why (expiry, age, deprecation), incl. keys a person must rotate."""
    from jobs.plan import build_plan

    if not math.isfinite(days) or days > PLAN_MAX_DAYS:
        fail(f"--days {days:g} is too far ahead; give at most {PLAN_MAX_DAYS}")
    fmt = pick_format(output, json_out)
    settings = cli_settings()
    engine = open_database(settings, read_only=True)
    now = utcnow()
    with session_scope(engine) as session:
        items = build_plan(session, now=now, days=days)
    if fmt in (OutputFormat.json, OutputFormat.yaml):
        emit({"generated_at": now, "days": days, "items": [item.as_dict() for item in items]}, fmt)
        return
    rows, notes = [], []
    for item in items:
        when = "overdue" if item.overdue else relative(item.when, now)
        what = item.action if item.target_credential_type == item.credential_type else f"{item.action} → {item.target_credential_type}"
        if item.run_state:
            what += f" ({item.run_state})"
        rows.append([iso(item.when), when, item.key + (" [admin]" if item.admin else ""), item.provider, item.reason, what])
        if item.note:
            notes.append(f"  {item.key}: {item.note}")
    print_table(["when", "due", "key", "provider", "why", "action"], rows, wide=fmt is OutputFormat.wide,
                title=f"Rotations in the next {days:g} days", empty=f"Nothing rotates in the next {days:g} days.")
    if notes:
        typer.echo("\nNotes:\n" + "\n".join(notes))


def register(app: typer.Typer) -> None:
    app.command("scheduler")(scheduler)
    app.command("plan")(plan)
