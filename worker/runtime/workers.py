"""Running the actors: an in-process Dramatiq worker (tests, demo) and ``run_worker`` for
``keyrotor worker`` (N processes × M threads, clean shutdown on SIGTERM/SIGINT).

With several processes, Dramatiq's own process management (``dramatiq.cli.main``) runs them: it
spawns the children, funnels their output through one pipe (no interleaved lines), forwards
SIGTERM/SIGINT, and when a child dies unexpectedly it logs CRITICAL, stops the others and exits
non-zero, so that Kubernetes restarts the pod instead of it running at reduced capacity unnoticed.
Each child is set up by ``boot_process``: the same logging as the parent (format, level,
redaction), the broker with the actors, the pipeline context.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import sys
import threading
from typing import Any, Callable, Optional

import dramatiq
from dramatiq import Worker

from worker import log, metrics
from worker.runtime.broker import setup_broker
from worker.queues import REQUEST_QUEUE, STEP_QUEUE
from worker.runtime.stream import start_request_stream
from worker.settings import get_settings
from worker.pipeline.context import configure, context_from_settings

logger = log.get_logger("keyrotor.pipeline.workers")

#: Seconds a stopping worker gives in-flight steps (unacknowledged messages are redelivered anyway).
SHUTDOWN_TIMEOUT_S = 30
#: Exit code of a worker process that could not set itself up (Dramatiq's "broker connection failed").
EXIT_BOOT_FAILED = 3
#: How long the idle threads of ``keyrotor worker`` wait at a time (Dramatiq's default, which the
#: processes of ``-p N`` use too): an idle worker wakes once a second per thread instead of ten
#: times, and a stop takes up to a second. New work does not wait for it: a queue's bell, or a
#: consumer with room (worker/runtime/looks.py), hands it to the threads at once.
SERVE_TIMEOUT_MS = 1000


def start_worker(broker: Optional[dramatiq.Broker] = None, *, threads: int = 4, settings: Any = None,
                 timeout_ms: int = 100) -> Worker:
    """Start a Dramatiq worker in this process (background threads); call ``.stop()`` to end it.
    ``timeout_ms``: how long its idle threads wait at a time, so how soon ``.stop()`` returns."""
    broker = broker or setup_broker(settings)
    worker = Worker(broker, queues={STEP_QUEUE, REQUEST_QUEUE}, worker_threads=threads, worker_timeout=timeout_ms)
    worker.start()
    return worker


def _serve(threads: int, settings: Any = None) -> None:
    broker = setup_broker(settings)
    context = context_from_settings(settings)
    configure(context)
    worker = start_worker(broker, threads=threads, timeout_ms=SERVE_TIMEOUT_MS)
    requests = start_request_stream(settings or get_settings(), context.engine)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    logger.info("worker.started", threads=threads)
    # Wait in short slices: a signal delivered to another thread only sets CPython's flag, and a
    # main thread blocked in an untimed wait would never run the handler (a SIGTERM ignored).
    while not stop.wait(0.5):
        pass
    logger.info("worker.stopping")
    requests.stop()  # an entry read but not acknowledged is claimed by another worker
    worker.stop(timeout=SHUTDOWN_TIMEOUT_S * 1000)  # in-flight steps finish; unacked messages are redelivered anyway


def boot_process() -> None:
    """Set up one worker process that ``dramatiq.cli`` spawned (it then runs the Dramatiq worker).

    Logging is configured first, like every keyrotor process: JSON by default, level, redaction,
    third-party loggers. Lines go to this process's stdout, which Dramatiq points at its log pipe.
    A failure is logged as one line and ends the process (no plain-text traceback)."""
    settings = get_settings()
    log.configure_logging(settings.log_level, settings.log_format, stream=sys.stdout)
    try:
        setup_broker(settings)
        context = context_from_settings(settings)
        configure(context)
        # Each process reads the request stream in a daemon thread: what a killed process held is
        # claimed by the others (XAUTOCLAIM), so nothing needs a clean stop here.
        start_request_stream(settings, context.engine)
    except Exception as exc:
        logger.critical("worker.boot_failed", error=type(exc).__name__, detail=str(exc)[:300])
        raise SystemExit(EXIT_BOOT_FAILED) from None
    logger.info("worker.process_started")


def live_processes() -> int:
    """How many of the worker processes this process started are running."""
    return len(multiprocessing.active_children())


def worker_problems(processes: int, broker_reachable: Callable[[], bool]) -> list[str]:
    """Why this worker cannot do its job right now (empty: healthy). For ``/healthz``."""
    problems = []
    if processes > 1:
        alive = live_processes()
        if alive < processes:
            problems.append(f"{processes - alive} of {processes} worker processes are not running")
    if not broker_reachable():
        problems.append("the broker (Redis, KEYROTOR_REDIS_URL) does not answer")
    return problems


def run_worker(processes: int = 1, threads: int = 4, settings: Any = None) -> int:
    """Serve the pipeline until SIGTERM/SIGINT: ``processes`` processes of ``threads`` threads.

    Returns the exit code: 0 after a requested stop, non-zero when a worker process died."""
    if processes <= 1:
        _serve(threads, settings)
        return 0
    from dramatiq import cli as dramatiq_cli


    # /metrics is served by this parent (keyrotor worker starts the server here): the children
    # write their metrics to files it sums (prometheus-client multiprocess mode). Set up before
    # they start: a spawned child picks its metric storage when it imports prometheus-client.
    metrics.enable_multiprocess()
    # Spawned, not forked: this process already runs threads (metrics server) and holds connections.
    if multiprocessing.get_start_method(allow_none=True) != "spawn":
        multiprocessing.set_start_method("spawn", force=True)
    args = dramatiq_cli.make_argument_parser().parse_args([
        f"{__name__}:boot_process", "--processes", str(processes), "--threads", str(threads),
        "--queues", STEP_QUEUE, REQUEST_QUEUE, "--skip-logging",
        "--worker-shutdown-timeout", str(SHUTDOWN_TIMEOUT_S * 1000),
    ])
    try:
        # Dramatiq writes the children's lines (already JSON and redacted) to stderr; keyrotor's
        # service logs go to stdout, like the single-process worker and the scheduler.
        with contextlib.redirect_stderr(sys.stdout):
            code = dramatiq_cli.main(args)
    finally:
        metrics.disable_multiprocess()
    return int(code or 0)
