"""Prometheus metrics and the /metrics + /healthz server shared by worker and scheduler.

Labels never carry a secret, a key id or a run id (cardinality and confidentiality): only
provider names, step names, outcomes, error classes and states.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable, Iterator, Optional

from prometheus_client import (CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector,
                               generate_latest)
from prometheus_client.metrics_core import Metric

ROTATIONS = Counter(
    "keyrotor_rotations_total",
    "Rotation runs that reached an end state, by provider and outcome (completed/failed/rolled_back/needs_attention).",
    ["provider", "outcome"],
)
STEP_DURATION = Histogram(
    "keyrotor_step_duration_seconds",
    "Wall time of one pipeline step execution.",
    ["step"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
STEP_FAILURES = Counter(
    "keyrotor_step_failures_total",
    "Pipeline step executions that raised, by step and error class.",
    ["step", "error"],
)
PROVIDER_REQUESTS = Counter(
    "keyrotor_provider_requests_total",
    "Calls to a provider API, by provider, call (issue/check/revoke/list) and status.",
    ["provider", "call", "status"],
)
QUEUE_MESSAGES_REJECTED = Counter(
    "keyrotor_queue_messages_rejected_total",
    "Queue messages rejected (undecodable envelopes, malformed requests or requests for unknown keys), by reason.",
    ["reason"],
)
DEAD_LETTERS = Counter(
    "keyrotor_dead_letters_total",
    "Pipeline messages whose retries were exhausted, by step.",
    ["step"],
)



class SchedulerMetrics:
    """The scheduler's gauges. Created only in the scheduler process (``scheduler_metrics()``), so a
    worker's /metrics never shows them. ``keys_due``/``open_runs`` are the leader's view: a
    scheduler that is not (or no longer) the leader exports none, so ``sum()`` over replicas never
    counts a key twice after a failover."""

    def __init__(self) -> None:
        self.leader = Gauge("keyrotor_scheduler_leader", "1 while this scheduler holds the leader lock.")
        self.keys_due = Gauge("keyrotor_keys_due", "Keys whose next_due_at has passed, by provider (leader only).",
                              ["provider"])
        self.open_runs = Gauge("keyrotor_open_runs", "Open rotation runs by state (leader only).", ["state"])

    def set_leader(self, leads: bool) -> None:
        self.leader.set(1 if leads else 0)
        if not leads:
            self.keys_due.clear()
            self.open_runs.clear()

    def set_backlog(self, due: Iterable[tuple[str, int]], open_runs: Iterable[tuple[str, int]]) -> None:
        self.keys_due.clear()
        for provider, count in due:
            self.keys_due.labels(provider).set(count)
        self.open_runs.clear()
        for state, count in open_runs:
            self.open_runs.labels(state).set(count)


_scheduler_metrics: Optional[SchedulerMetrics] = None
_scheduler_metrics_lock = threading.Lock()


def scheduler_metrics() -> SchedulerMetrics:
    """The scheduler's gauges, registered on first use (by the scheduler process only)."""
    global _scheduler_metrics
    with _scheduler_metrics_lock:
        if _scheduler_metrics is None:
            _scheduler_metrics = SchedulerMetrics()
        return _scheduler_metrics

# --------------------------------------------------------------------------- several processes
#: prometheus-client's multiprocess mode: each process writes its values to files in this dir.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_multiproc_dir: Optional[str] = None


def enable_multiprocess() -> str:
    """Before starting worker processes: give them a fresh directory for their metric files.

    prometheus-client picks its value storage when a process imports it, so the variable must be
    in the environment the children start with (``spawn``). This (parent) process then serves the
    sum of the children's files on /metrics, and the ``process_*`` metrics of each process.
    Workers export no gauges (the scheduler's are created only by the scheduler), so a dead
    child leaves no stale series behind. A fresh directory each time: files of an earlier run
    would be added to this one's counters."""
    global _multiproc_dir
    path = tempfile.mkdtemp(prefix="keyrotor-metrics-")
    os.environ[MULTIPROC_ENV] = path
    _multiproc_dir = path
    return path


def disable_multiprocess() -> None:
    """After the children ended: serve this process's own registry again; remove the files."""
    global _multiproc_dir
    path, _multiproc_dir = _multiproc_dir, None
    if path is not None:
        if os.environ.get(MULTIPROC_ENV) == path:
            del os.environ[MULTIPROC_ENV]
        shutil.rmtree(path, ignore_errors=True)


def _constant(pid: int) -> Callable[[], int]:
    """``ProcessCollector`` wants a callable for the pid; this one always names ``pid``."""
    return lambda: pid


class ProcessesCollector:
    """``process_*`` metrics (CPU, memory, open files, start time) of this process and of the
    worker processes it started, one series per process with a ``pid`` label.

    In multiprocess mode the summed registry has no process metrics of its own: prometheus-client's
    ``ProcessCollector`` reads ``/proc/<pid>`` of one process, so it is asked once per live process."""

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self._pids = pids

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for pid in self._pids():
            for family in ProcessCollector(pid=_constant(pid), registry=None).collect():
                target = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for sample in family.samples:
                    target.add_sample(sample.name, {**sample.labels, "pid": str(pid)}, sample.value)
        yield from merged.values()


def _own_and_children_pids() -> list[int]:
    return [os.getpid(), *(p.pid for p in multiprocessing.active_children() if p.pid is not None)]


def exposition() -> bytes:
    """What /metrics serves: the children's metrics summed in multiprocess mode, else ours."""
    path = _multiproc_dir
    if path is None:
        return generate_latest(REGISTRY)
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)
    registry.register(ProcessesCollector(_own_and_children_pids))
    return generate_latest(registry)


# --------------------------------------------------------------------------- /healthz
#: Returns what stops this process from doing its job (empty list: healthy); None: always healthy.
_health_check: Optional[Callable[[], list[str]]] = None


def set_health_check(check: Optional[Callable[[], list[str]]]) -> None:
    """Make /healthz answer 503 with ``check()``'s problems (one per line) while there are any."""
    global _health_check
    _health_check = check


def health() -> tuple[int, bytes]:
    """(HTTP status, body) of /healthz. A check that raises counts as unhealthy."""
    check = _health_check
    if check is None:
        return 200, b"ok"
    try:
        problems = check()
    except Exception as exc:
        problems = [f"health check failed: {type(exc).__name__}"]
    if not problems:
        return 200, b"ok"
    return 503, ("\n".join(problems) + "\n").encode()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        if self.path.split("?", 1)[0] == "/healthz":
            status, body = health()
            ctype = "text/plain; charset=utf-8"
        elif self.path.split("?", 1)[0] == "/metrics":
            body, ctype, status = exposition(), CONTENT_TYPE_LATEST, 200
        else:
            body, ctype, status = b"not found", "text/plain; charset=utf-8", 404
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # probes every few seconds: stay quiet
        return


_servers: dict[int, ThreadingHTTPServer] = {}


def start_metrics_server(port: int, host: str = "0.0.0.0") -> int:
    """Serve ``/metrics`` and ``/healthz`` on a daemon thread; returns the bound port.

    ``port=0`` binds a free port (tests). Starting twice on the same port is a no-op.
    """
    if port and port in _servers:
        return port
    server = ThreadingHTTPServer((host, port), _Handler)
    server.daemon_threads = True
    bound = int(server.server_address[1])
    _servers[bound] = server
    threading.Thread(target=server.serve_forever, name=f"metrics-{bound}", daemon=True).start()
    return bound


def stop_metrics_server(port: int) -> None:
    server = _servers.pop(port, None)
    if server is not None:
        server.shutdown()
        server.server_close()
