"""``keyrotor worker``: serve the rotation pipeline (Dramatiq actors on Redis) until SIGTERM/SIGINT."""

from __future__ import annotations

import typer

from worker.cli.common import cli_settings, open_database, redis_reachable, require_redis


def worker(
    processes: int = typer.Option(1, "--processes", "-p", min=1, max=64, help="Worker processes."),
    threads: int = typer.Option(4, "--threads", "-t", min=1, max=256, help="Threads per process."),
) -> None:
    """Consume rotation steps and rotation requests from Redis (KEYROTOR_REDIS_URL).

    Serves /metrics and /healthz on KEYROTOR_METRICS_PORT (0 = off); /healthz answers 503 while a
    worker process is missing or Redis does not answer. Stops cleanly on SIGTERM: in-flight steps
    finish; anything unacknowledged is redelivered to another worker. When a worker process dies,
    the others are stopped and the command exits non-zero (the pod is restarted).
    """
    from worker.log import configure_logging

    settings = cli_settings()
    configure_logging(settings.log_level, settings.log_format)  # a service: its INFO lines are the point
    engine = open_database(settings)
    require_redis(settings.redis_url)
    from worker.doctor import log_unresolvable_references
    from worker.pipeline.workers import run_worker, worker_problems

    log_unresolvable_references(engine, settings)  # one warning per broken reference, no values
    if settings.metrics_port:
        from worker.metrics import set_health_check, start_metrics_server

        set_health_check(lambda: worker_problems(processes, lambda: redis_reachable(settings.redis_url, timeout=1.0)))
        start_metrics_server(settings.metrics_port)
    code = run_worker(processes=processes, threads=threads, settings=settings)
    if code:
        raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("worker")(worker)
