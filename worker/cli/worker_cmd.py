"""``keyrotor worker``: serve the rotation pipeline (Dramatiq actors on Redis) until SIGTERM/SIGINT."""

from __future__ import annotations

import typer

from worker.urls import display_url

from worker.cli.common import (cli_settings, masked_database_url, open_database, redis_reachable, require_redis,
                               retried_if_dropped, serve_metrics)

# Commands import the service modules they use inside the command function, not here:
# `keyrotor --help` and each command start without importing the whole service (start-up cost).


def worker(
    processes: int = typer.Option(1, "--processes", "-p", min=1, max=64, help="Worker processes."),
    threads: int = typer.Option(4, "--threads", "-t", min=1, max=256, help="Threads per process."),
) -> None:
    """Consume rotation steps and rotation requests from Redis (KEYROTOR_REDIS_URL).

    Serves /metrics and /healthz on KEYROTOR_METRICS_PORT (default 9108; 0 = off); /healthz answers 503 while a
    worker process is missing or Redis does not answer. Stops cleanly on SIGTERM: in-flight steps
    finish; anything unacknowledged is redelivered to another worker. When a worker process dies,
    the others are stopped and the command exits non-zero (the pod is restarted).
    """
    import os

    from worker.log import configure_logging
    from worker.settings import get_settings

    # One connection per step thread plus one for the run-lease renewer (docs/scaling.md): with a
    # smaller pool the extra threads open and close a PostgreSQL connection for every checkout.
    # Through the environment, so that the spawned worker processes size their pools alike.
    if "KEYROTOR_DB_POOL_SIZE" not in os.environ:
        os.environ["KEYROTOR_DB_POOL_SIZE"] = str(threads + 1)
        get_settings.cache_clear()
    settings = cli_settings()
    configure_logging(settings.log_level, settings.log_format)  # a service: its INFO lines are the point
    engine = retried_if_dropped(lambda: open_database(settings))
    require_redis(settings.redis_url)
    from worker.doctor import log_unresolvable_references
    from worker.runtime.workers import run_worker, worker_problems

    # One warning per broken reference, no values.
    retried_if_dropped(lambda: log_unresolvable_references(engine, settings))
    metrics_port = 0
    if settings.metrics_port_for("worker"):
        from worker.metrics import set_health_check

        set_health_check(lambda: worker_problems(processes, lambda: redis_reachable(settings.redis_url, timeout=1.0)))
        metrics_port = serve_metrics(settings, "worker")
    from worker.log import get_logger
    from worker.queues import REQUEST_QUEUE, STEP_QUEUE

    # Where this worker reads and writes, so a misdirected one is obvious from its first line.
    get_logger("keyrotor.worker").info(
        "worker_started", database=masked_database_url(settings.database_url), redis=display_url(settings.redis_url),
        namespace=settings.queue_namespace, queues=[STEP_QUEUE, REQUEST_QUEUE], vault=settings.vault_addr or "(not set)",
        processes=processes, threads=threads, metrics_port=metrics_port or "off")
    code = run_worker(processes=processes, threads=threads, settings=settings)
    if code:
        raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("worker")(worker)
