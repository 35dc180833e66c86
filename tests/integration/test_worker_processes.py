"""`keyrotor worker --processes 2` (the chart's default) as a subprocess on the real Redis.

Every process it starts logs like the parent (JSON, level, redaction); a worker process that dies
brings the worker down with a CRITICAL line (and /healthz says so meanwhile); /metrics of a worker
shows worker metrics and each process's ``process_*`` metrics, never the scheduler's gauges.

The children are made to log through a test actor: a ``sitecustomize`` module on PYTHONPATH (run
by every Python process at start) declares ``leak_probe`` on whatever broker keyrotor installs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TOKEN = "probe0token0value0abcdef"        # logged as "Bearer <TOKEN>": credential-shaped
SECRET = "probe-secret-object-value-42"   # logged as a Secret object under an innocent key
HVAC_TOKEN = "hvs.probe0vault0token0xyz"   # logged by a third-party (stdlib) logger

SITECUSTOMIZE = f'''
import logging, os
import dramatiq

_set_broker = dramatiq.set_broker


def leak_probe(n):
    from worker.log import get_logger
    from worker.secret import Secret

    get_logger("keyrotor.test.probe").warning("probe.logged", n=n, pid=os.getpid(),
                                               header="Bearer {TOKEN}", value=Secret("{SECRET}"))
    logging.getLogger("hvac.adapters").warning("retrying with token %s", "{HVAC_TOKEN}")
    logging.getLogger("dramatiq.probe").debug("a debug line the INFO level filter drops")
    logging.getLogger("httpx").info("an httpx INFO line (httpx is kept at WARNING)")


def set_broker(broker):
    _set_broker(broker)
    if "leak_probe" not in broker.actors:
        dramatiq.actor(leak_probe, actor_name="leak_probe", queue_name="rotation", broker=broker)


dramatiq.set_broker = set_broker
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Worker:
    def __init__(self, tmp: Path, redis_url: str, namespace: str) -> None:
        probe_dir = tmp / "probe"
        probe_dir.mkdir()
        (probe_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
        self.port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYROTOR_", "VAULT_", "PROMETHEUS_"))}
        env.update({
            "PYTHONPATH": os.pathsep.join([str(probe_dir), str(REPO)]),
            "KEYROTOR_DATABASE_URL": f"sqlite:///{tmp}/keyrotor.db",
            "KEYROTOR_REDIS_URL": redis_url, "KEYROTOR_QUEUE_NAMESPACE": namespace,
            "KEYROTOR_METRICS_PORT": str(self.port), "KEYROTOR_LOG_FORMAT": "json", "KEYROTOR_LOG_LEVEL": "INFO",
            "VAULT_ADDR": "http://127.0.0.1:1", "VAULT_TOKEN": "unused-here",
        })
        self.out, self.err = tmp / "stdout", tmp / "stderr"
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "worker.cli.main", "worker", "--processes", "2",
                                          "--threads", "2"], cwd=tmp, env=env, stdout=out, stderr=err,
                                         start_new_session=True)

    def text(self) -> str:
        return self.out.read_text(errors="replace") + self.err.read_text(errors="replace")

    def lines(self) -> list[str]:
        return [line for line in self.text().splitlines() if line.strip()]

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"worker exited early ({self.proc.returncode}):\n{self.text()[-3000:]}"
            try:
                if len(self.children()) == 2 and self.get("/healthz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"worker not ready after {timeout}s:\n{self.text()[-3000:]}")

    def children(self) -> list[int]:
        def read(path: str) -> str:
            try:
                return Path(path).read_bytes().decode(errors="replace")
            except FileNotFoundError:  # a thread or process that ended while we looked
                return ""

        pids: list[int] = []
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            pids += [int(p) for p in read(f"{task}/children").split()]
        return [p for p in pids if "spawn_main" in read(f"/proc/{p}/cmdline")]

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)  # as Kubernetes does: to the main process only
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        return int(self.proc.returncode)


@pytest.fixture
def worker(tmp_path: Path, redis_url: str, redis_namespace: str) -> Iterator[Worker]:
    w = Worker(tmp_path, redis_url, redis_namespace)
    try:
        w.wait_ready()
        yield w
    finally:
        if w.proc.poll() is None:
            os.killpg(w.proc.pid, signal.SIGKILL)
            w.proc.wait(timeout=10)


def _send_probe(redis_url: str, namespace: str, n: int) -> None:
    import dramatiq

    from worker.runtime.broker import make_redis_broker

    broker = make_redis_broker(redis_url, namespace)
    try:
        broker.declare_queue("rotation")
        broker.enqueue(dramatiq.Message(queue_name="rotation", actor_name="leak_probe", args=(n,), kwargs={}, options={}))
    finally:
        broker.close()


def _probe_pids(worker: Worker) -> set[int]:
    pids = set()
    for line in worker.lines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("event") == "probe.logged":
            pids.add(entry["pid"])
    return pids


def test_every_line_of_every_worker_process_is_json_and_redacted(worker: Worker, redis_url: str,
                                                                  redis_namespace: str) -> None:
    children = set(worker.children())
    assert len(children) == 2
    deadline, n = time.monotonic() + 60, 0
    while _probe_pids(worker) != children and time.monotonic() < deadline:
        _send_probe(redis_url, redis_namespace, n)  # until both children have handled one
        n += 1
        time.sleep(0.5)
    assert worker.stop() == 0
    assert _probe_pids(worker) == children, worker.text()[-3000:]
    entries = []
    for line in worker.lines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line: {line[:300]!r}")
    text = worker.text()
    for value in (TOKEN, SECRET, HVAC_TOKEN):
        assert value not in text
    probes = [e for e in entries if e.get("event") == "probe.logged"]
    assert all(e["header"] == "[REDACTED]" and e["value"] == "[REDACTED]" for e in probes)
    hvac = [e for e in entries if e.get("logger") == "hvac.adapters"]
    assert hvac and all("[REDACTED]" in e["event"] for e in hvac)
    assert not [e for e in entries if e.get("level") == "debug" or e.get("logger") == "httpx"]
    # Dramatiq's own lines in the children go through the same chain.
    assert {e["logger"] for e in entries if e["event"] == "Worker process is ready for action."} == {
        "dramatiq.WorkerProcess(0)", "dramatiq.WorkerProcess(1)"}


def test_a_killed_worker_process_brings_the_worker_down_with_a_critical_line(worker: Worker) -> None:
    victim, _other = worker.children()
    os.kill(victim, signal.SIGKILL)
    statuses = []
    deadline = time.monotonic() + 60
    while worker.proc.poll() is None and time.monotonic() < deadline:
        try:
            statuses.append(worker.get("/healthz")[0])
        except OSError:
            pass  # the server went away with the process
        time.sleep(0.05)
    assert worker.proc.poll() is not None, "the worker kept running with a dead process"
    assert worker.proc.returncode != 0
    assert 503 in statuses, statuses[-20:]
    critical = [json.loads(line) for line in worker.lines() if '"critical"' in line]
    assert any(str(victim) in e["event"] and "exited unexpectedly" in e["event"] for e in critical), worker.text()[-3000:]


def test_worker_metrics_have_process_series_per_process_and_no_scheduler_gauges(worker: Worker) -> None:
    status, body = worker.get("/metrics")
    assert status == 200
    pids = {str(p) for p in [worker.proc.pid, *worker.children()]}
    rss = {line.split('pid="', 1)[1].split('"', 1)[0] for line in body.splitlines()
           if line.startswith("process_resident_memory_bytes{")}
    assert rss == pids
    for name in ("keyrotor_scheduler_leader", "keyrotor_keys_due", "keyrotor_open_runs"):
        assert name not in body
