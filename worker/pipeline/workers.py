"""Running the actors: an in-process Dramatiq worker (tests, demo) and ``run_worker`` for
``keyrotor worker`` (N processes × M threads, clean shutdown on SIGTERM/SIGINT)."""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import signal
import threading
from typing import Any, Optional

import dramatiq
from dramatiq import Worker

from worker import log
from worker.pipeline.broker import REQUEST_QUEUE, STEP_QUEUE, setup_broker

logger = log.get_logger("keyrotor.pipeline.workers")


def start_worker(broker: Optional[dramatiq.Broker] = None, *, threads: int = 4, settings: Any = None) -> Worker:
    """Start a Dramatiq worker in this process (background threads); call ``.stop()`` to end it."""
    broker = broker or setup_broker(settings)
    worker = Worker(broker, queues={STEP_QUEUE, REQUEST_QUEUE}, worker_threads=threads, worker_timeout=100)
    worker.start()
    return worker


def _serve(threads: int, settings: Any = None) -> None:
    from worker.pipeline.context import configure, context_from_settings

    broker = setup_broker(settings)
    configure(context_from_settings(settings))
    worker = start_worker(broker, threads=threads)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    logger.info("worker.started", threads=threads)
    stop.wait()
    logger.info("worker.stopping")
    worker.stop(timeout=30_000)  # in-flight steps finish; unacked messages are redelivered anyway


def run_worker(processes: int = 1, threads: int = 4, settings: Any = None) -> None:
    """Serve the pipeline until SIGTERM/SIGINT: ``processes`` processes of ``threads`` threads."""
    if processes <= 1:
        _serve(threads, settings)
        return
    from worker import metrics

    # /metrics is served by this parent (keyrotor worker starts the server here): the children
    # write their metrics to files it sums (prometheus-client multiprocess mode). Set up before
    # they start: a spawned child picks its metric storage when it imports prometheus-client.
    metrics.enable_multiprocess()
    ctx = multiprocessing.get_context("spawn")
    children = [ctx.Process(target=_serve, args=(threads, None), name=f"keyrotor-worker-{i}") for i in range(processes)]
    try:
        for child in children:
            child.start()

        def forward(signum: int, _frame: Any) -> None:
            for child in children:
                if child.pid is not None and child.is_alive():
                    child.terminate()

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        pending = list(children)
        while pending:  # in exit order, so a dead child's live gauges go at once
            multiprocessing.connection.wait([c.sentinel for c in pending])
            for child in [c for c in pending if not c.is_alive()]:
                child.join()
                if child.pid is not None:
                    metrics.process_exited(child.pid)
                pending.remove(child)
    finally:
        for child in children:
            if child.is_alive():
                child.terminate()
                child.join(timeout=30)
        metrics.disable_multiprocess()
