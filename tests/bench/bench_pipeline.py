"""Pipeline throughput and latency: N keys rotated concurrently in-process.

The real step code runs against PostgreSQL, the Redis rate limiter, the suite's real OpenBao
server and the provider stand-in over HTTP, each in its own process (`bao server -dev`,
`keyrotor sandbox provider`), so the benchmarked process does only keyrotor's own work; one vault_copy integration per key, so
propagate and verify do real work. Three phases, same process, same keys:

1. baseline — the N rotations one after the other, each driven step by step in this thread with
   no broker (``worker.runtime.inline.drive``): the cost of the work itself (latency = one
   ``drive`` call);
2. pipeline — the N rotations requested at once and run by a Dramatiq ``Worker`` (StubBroker,
   ``THREADS`` threads): rotations per second, p50/p95 end-to-end latency (run created → finished),
   and the ratio to the baseline;
3. memory — phase 2 again under ``tracemalloc``: peak traced allocation per rotation, plus the
   process's peak RSS.

Run: ``make bench`` or ``pytest tests/bench/bench_pipeline.py -m bench -s``.
Knobs: KEYROTOR_BENCH_KEYS (default 24), KEYROTOR_BENCH_THREADS (default 8),
KEYROTOR_BENCH_PROFILE=1 (print a cProfile of the baseline phase).
"""

from __future__ import annotations

import dataclasses
import os
import re
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from sqlmodel import col, select

from worker.db.models import RotationRun
from worker.db.session import make_engine, session_scope
from worker.secret import Secret

pytestmark = [pytest.mark.bench, pytest.mark.integration]

KEYS = int(os.environ.get("KEYROTOR_BENCH_KEYS", "24"))
THREADS = int(os.environ.get("KEYROTOR_BENCH_THREADS", "8"))
TOKEN_ENV = "KR_BENCH_PROVIDER_TOKEN"
TERMINAL = {"completed", "failed", "rolled_back", "needs_attention", "cancelled"}


@dataclasses.dataclass
class Bench:
    engine: Any
    ctx: Any
    keys: list[str]


def _inventory(provider_url: str, mount: str) -> dict[str, Any]:
    from keyrotor_sandbox.provider import standin_provider_spec

    spec = standin_provider_spec(provider_url, admin_token_ref={"env": TOKEN_ENV},
                                 rate_limit={"requests": 10_000, "per": "1s"},
                                 activation={"poll_interval": "1s", "timeout": "30s"})
    return {
        "version": 1,
        "policies": {"bench": {"expiry_lead_time": "7d", "max_age": "90d", "grace_period": 0}},
        "providers": {"bench": spec},
        "integrations": {"copy": {"kind": "vault_copy", "mount": mount, "path": "copies/{key_slug}", "field": "token"}},
        "keys": {f"bench/key-{i:03d}": {"provider": "bench", "credential_type": "api_key", "owner": "bench@example.com",
                                         "vault": {"mount": mount, "path": f"apps/bench/{i:03d}", "field": "api_key"},
                                         "policy": "bench", "integrations": ["copy"]}
                 for i in range(KEYS)},
    }


def _standin(args: list[str], tmp_path: Path, name: str, stack: ExitStack) -> str:
    """Start `keyrotor sandbox ...` on a free port in its own process; its URL from the ready line."""
    log = open(tmp_path / f"{name}.log", "w+b")
    stack.callback(log.close)
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli.main", "sandbox", *args, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    stack.callback(stop)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()  # "... listening on http://127.0.0.1:PORT ..."
    match = re.search(r"https?://[\d.]+:\d+", line)
    if not match:
        log.seek(0)
        raise AssertionError(f"{name} stand-in did not start: {line!r} {log.read()[-2000:]!r}")
    return match.group(0)


@pytest.fixture
def bench(pg_url: str, redis_url: str, redis_namespace: str, vault: Any, vault_mount: str, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[Bench]:
    import httpx

    from worker.inventory.apply import apply_inventory
    from worker.inventory.loader import load_inventory
    from worker.log import configure_logging
    from worker.pipeline.context import configure, context_from_settings
    from worker.settings import get_settings, load_settings
    from worker.vault.store import VaultStore

    stack = ExitStack()
    devnull = stack.enter_context(open(os.devnull, "w"))
    configure_logging("WARNING", "json", stream=devnull)  # a benchmark of the pipeline, not of logging
    admin_token = f"admin-{uuid.uuid4().hex}"
    provider_url = _standin(["provider", "--admin-token", admin_token], tmp_path, "provider", stack)
    mount = vault_mount
    monkeypatch.setenv(TOKEN_ENV, admin_token)
    settings = load_settings(database_url=pg_url, redis_url=redis_url, queue_namespace=redis_namespace,
                             VAULT_ADDR=vault.addr, VAULT_TOKEN=vault.token, vault_mount=mount, metrics_port=0)
    ctx = dataclasses.replace(context_from_settings(settings), notify=None, actor="bench")
    configure(ctx)
    store = VaultStore.from_settings(settings)
    engine = make_engine(pg_url)
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(_inventory(provider_url, mount)), encoding="utf-8")
    with session_scope(engine) as session:
        apply_inventory(session, load_inventory(path), actor="bench")
    keys = sorted(load_inventory(path).keys)
    with httpx.Client(headers={"Authorization": f"Bearer {admin_token}"}) as http:
        for i, _name in enumerate(keys):  # each key's first credential, live and in Vault
            seeded = http.post(f"{provider_url}/_sandbox/keys", json={"name": f"seed-{i}"}).json()
            store.promote(mount, f"apps/bench/{i:03d}", "api_key", Secret(seeded["apiKey"]),
                          provider_key_id=seeded["id"], expected_version=None)
    try:
        yield Bench(engine=engine, ctx=ctx, keys=keys)
    finally:
        configure(None)
        ctx.engine.dispose()
        engine.dispose()
        get_settings.cache_clear()
        stack.close()


def _request_all(engine: Any, keys: list[str], tag: str) -> list[str]:
    from worker.pipeline.requests import request_rotation

    ids = []
    with session_scope(engine) as session:
        for name in keys:
            run, created = request_rotation(session, key_name=name, reason="bench", trigger="manual",
                                            requested_by="bench", idempotency_key=f"{tag}-{name}-{uuid.uuid4().hex[:6]}")
            assert created
            ids.append(run.id)
    return ids


def _latencies(engine: Any, ids: list[str]) -> list[float]:
    with session_scope(engine) as session:
        runs = session.exec(select(RotationRun).where(col(RotationRun.id).in_(ids))).all()
        states = {str(getattr(r.state, "value", r.state)) for r in runs}
        assert states == {"completed"}, f"not every run completed: {states}"
        return [(r.finished_at - r.created_at).total_seconds() for r in runs]  # type: ignore[operator]


def _wait_all(engine: Any, ids: list[str], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope(engine) as session:
            open_runs = session.exec(select(RotationRun.id).where(col(RotationRun.id).in_(ids),
                                                                 col(RotationRun.finished_at).is_(None))).all()
        if not open_runs:
            return
        time.sleep(0.01)
    raise AssertionError(f"{len(open_runs)} of {len(ids)} runs still open after {timeout}s")


def _sequential(b: Bench) -> tuple[float, list[float]]:
    from worker.runtime.inline import drive

    ids = _request_all(b.engine, b.keys, "seq")
    per_run = []
    started = time.perf_counter()
    for run_id in ids:
        one = time.perf_counter()
        assert drive(b.ctx, run_id).value == "completed"
        per_run.append(time.perf_counter() - one)
    elapsed = time.perf_counter() - started
    _latencies(b.engine, ids)  # all completed
    return elapsed, per_run


def _concurrent(b: Bench, tag: str) -> tuple[float, list[float]]:
    from worker.runtime.broker import make_stub_broker, reset_broker, setup_broker
    from worker.pipeline.outbox import enqueue_run
    from worker.runtime.workers import start_worker

    broker = setup_broker(broker=make_stub_broker())
    worker = start_worker(broker, threads=THREADS)
    try:
        ids = _request_all(b.engine, b.keys, tag)
        started = time.perf_counter()
        with session_scope(b.engine) as session:
            for run_id in ids:
                enqueue_run(session.get(RotationRun, run_id))  # type: ignore[arg-type]
        _wait_all(b.engine, ids)
        elapsed = time.perf_counter() - started
    finally:
        worker.stop()
        broker.close()
        reset_broker()
    return elapsed, _latencies(b.engine, ids)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_pipeline_throughput_and_latency(bench: Bench) -> None:
    profiler = None
    if os.environ.get("KEYROTOR_BENCH_PROFILE"):
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    cpu0 = time.process_time()
    seq_s, seq_lat = _sequential(bench)
    cpu1 = time.process_time()
    if profiler is not None:
        import pstats

        profiler.disable()
        print("\n--- where the baseline's CPU goes (cumulative, top 25) ---")
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
    rss_before = _rss_kb()
    conc_s, conc_lat = _concurrent(bench, "conc")
    cpu2 = time.process_time()
    rss_after = _rss_kb()
    tracemalloc.start()
    mem_s, _ = _concurrent(bench, "mem")
    _current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    max_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    n = len(bench.keys)
    seq_rate, conc_rate = n / seq_s, n / conc_s
    print(f"\n--- rotation pipeline, {n} keys, PostgreSQL + Redis rate limiter + OpenBao + provider stand-in "
          "(own processes) over HTTP ---")
    print(f"baseline (inline, sequential, no broker): {seq_rate:7.2f} rotations/s   {seq_s:6.2f} s total   "
          f"per rotation p50 {statistics.median(seq_lat) * 1000:7.1f} ms  p95 {_pct(seq_lat, 0.95) * 1000:7.1f} ms")
    print(f"pipeline (StubBroker, {THREADS} worker threads):   {conc_rate:7.2f} rotations/s   {conc_s:6.2f} s total   "
          f"end-to-end p50 {statistics.median(conc_lat) * 1000:7.1f} ms  p95 {_pct(conc_lat, 0.95) * 1000:7.1f} ms")
    print(f"ratio pipeline / baseline throughput: {conc_rate / seq_rate:5.2f}x   "
          f"(latency p50 ratio {statistics.median(conc_lat) / statistics.median(seq_lat):5.2f}x; "
          f"2 cores, one Python process)")
    print(f"CPU of this process per rotation: baseline {(cpu1 - cpu0) / n * 1000:6.1f} ms "
          f"({(cpu1 - cpu0) / seq_s:4.0%} of wall), pipeline {(cpu2 - cpu1) / n * 1000:6.1f} ms "
          f"({(cpu2 - cpu1) / conc_s:4.0%} of wall)")
    print(f"memory: tracemalloc peak {peak / 1024:8.1f} KiB for {n} concurrent rotations = {peak / 1024 / n:6.1f} KiB "
          f"per rotation (phase took {mem_s:.2f}s traced); RSS +{(rss_after - rss_before)} KiB over the pipeline phase; "
          f"peak RSS {max_rss_kb / 1024:.1f} MiB")
    assert len(seq_lat) == len(conc_lat) == n
