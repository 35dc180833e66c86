"""`keyrotor worker -p N`: /metrics of the parent shows the sum over its worker processes."""

from __future__ import annotations

import multiprocessing
import os
import urllib.request

import pytest

from worker import metrics


def _count_dead_letters(times: int) -> None:
    from worker.metrics import DEAD_LETTERS

    for _ in range(times):
        DEAD_LETTERS.labels(step="promote").inc()


def _sample(body: str, name: str, **labels: str) -> float | None:
    wanted = name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    for line in body.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return None


@pytest.fixture
def multiproc() -> object:
    before = os.environ.get(metrics.MULTIPROC_ENV)
    path = metrics.enable_multiprocess()
    yield path
    metrics.disable_multiprocess()
    if before is not None:
        os.environ[metrics.MULTIPROC_ENV] = before
    assert not os.path.exists(path)


def test_parent_serves_the_sum_of_its_worker_processes(multiproc: str) -> None:
    ctx = multiprocessing.get_context("spawn")  # what run_worker uses
    children = [ctx.Process(target=_count_dead_letters, args=(n,)) for n in (2, 3)]
    for child in children:
        child.start()
    for child in children:
        child.join(30)
        assert child.exitcode == 0
    port = metrics.start_metrics_server(0, host="127.0.0.1")
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        metrics.stop_metrics_server(port)
    assert _sample(body, "keyrotor_dead_letters_total", step="promote") == 5.0, body[:2000]


def test_single_process_serves_its_own_registry() -> None:
    assert metrics.MULTIPROC_ENV not in os.environ
    _count_dead_letters(1)
    body = metrics.exposition().decode()
    assert (_sample(body, "keyrotor_dead_letters_total", step="promote") or 0) >= 1
