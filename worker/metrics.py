"""Prometheus metrics and the /metrics + /healthz server shared by worker and scheduler.

Labels never carry a secret, a key id or a run id (cardinality and confidentiality): only
provider names, step names, outcomes, error classes and states.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
KEYS_DUE = Gauge("keyrotor_keys_due", "Keys whose next_due_at has passed, by provider.", ["provider"])
OPEN_RUNS = Gauge("keyrotor_open_runs", "Open rotation runs by state.", ["state"])
SCHEDULER_LEADER = Gauge("keyrotor_scheduler_leader", "1 while this scheduler holds the leader lock.")
QUEUE_MESSAGES_REJECTED = Counter(
    "keyrotor_queue_messages_rejected_total",
    "Rotation request messages rejected (malformed or referring to unknown keys), by reason.",
    ["reason"],
)
DEAD_LETTERS = Counter(
    "keyrotor_dead_letters_total",
    "Pipeline messages whose retries were exhausted, by step.",
    ["step"],
)


# --------------------------------------------------------------------------- several processes
#: prometheus-client's multiprocess mode: each process writes its values to files in this dir.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_multiproc_dir: Optional[str] = None


def enable_multiprocess() -> str:
    """Before starting worker processes: give them a fresh directory for their metric files.

    prometheus-client picks its value storage when a process imports it, so the variable must be
    in the environment the children start with (``spawn``). This (parent) process then serves the
    sum of the children's files on /metrics. A fresh directory each time: files of an earlier run
    would be added to this one's counters."""
    global _multiproc_dir
    path = tempfile.mkdtemp(prefix="keyrotor-metrics-")
    os.environ[MULTIPROC_ENV] = path
    _multiproc_dir = path
    return path


def process_exited(pid: int) -> None:
    """A child ended: drop its live gauges (its counters keep counting in the sum)."""
    if _multiproc_dir is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, _multiproc_dir)


def disable_multiprocess() -> None:
    """After the children ended: serve this process's own registry again; remove the files."""
    global _multiproc_dir
    path, _multiproc_dir = _multiproc_dir, None
    if path is not None:
        if os.environ.get(MULTIPROC_ENV) == path:
            del os.environ[MULTIPROC_ENV]
        shutil.rmtree(path, ignore_errors=True)


def exposition() -> bytes:
    """What /metrics serves: the children's metrics summed in multiprocess mode, else ours."""
    path = _multiproc_dir
    if path is None:
        return generate_latest(REGISTRY)
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)
    return generate_latest(registry)


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        if self.path.split("?", 1)[0] == "/healthz":
            body, ctype, status = b"ok", "text/plain; charset=utf-8", 200
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
