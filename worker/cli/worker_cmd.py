"""``keyrotor worker``: serve the rotation pipeline (Dramatiq actors on Redis) until SIGTERM/SIGINT."""

from __future__ import annotations

import typer

from worker.cli.common import cli_settings, fail, open_database


def worker(
    processes: int = typer.Option(1, "--processes", "-p", min=1, max=64, help="Worker processes."),
    threads: int = typer.Option(4, "--threads", "-t", min=1, max=256, help="Threads per process."),
) -> None:
    """Consume rotation steps and rotation requests from Redis (KEYROTOR_REDIS_URL).

    Serves /metrics and /healthz on KEYROTOR_METRICS_PORT (0 = off). Stops cleanly on SIGTERM:
    in-flight steps finish; anything unacknowledged is redelivered to another worker.
    """
    from worker.cli.act_cmds import _redis_answers
    from worker.log import configure_logging

    settings = cli_settings()
    configure_logging(settings.log_level, settings.log_format)  # a service: its INFO lines are the point
    open_database(settings)
    if not _redis_answers(settings.redis_url):
        fail(f"Redis at {settings.redis_url} does not answer; set KEYROTOR_REDIS_URL", code=1)
    if settings.metrics_port:
        from worker.metrics import start_metrics_server

        start_metrics_server(settings.metrics_port)
    from worker.pipeline.workers import run_worker

    run_worker(processes=processes, threads=threads, settings=settings)


def register(app: typer.Typer) -> None:
    app.command("worker")(worker)
