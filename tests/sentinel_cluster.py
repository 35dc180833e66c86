"""A real Redis Sentinel deployment for tests: one master, one replica, three sentinels (quorum 2)
as ``redis-server`` processes on free ports, data and configs in the test's tmp directory.

``sentinel_cluster`` (fixture) yields a started ``SentinelCluster``; ``cluster.url`` is the
``redis+sentinel://`` URL keyrotor reads, ``kill_master()`` SIGKILLs the current master and
``wait_for_failover(old)`` waits until the sentinels have promoted the replica. A sentinel is
``redis-server CONF --sentinel`` (what the ``redis-sentinel`` binary is), so only redis-server is
needed. Missing, it fails the test under CI=true and skips it elsewhere. Every process is killed
in teardown.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import service_missing

MASTER_NAME = "krmaster"
#: Sentinel timing: the master is declared down after 1 s of silence, a failover attempt that
#: stalls is retried after 3 s, so a failover takes a few seconds.
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class SentinelCluster:
    root: Path
    server: str
    redis_ports: list[int] = field(default_factory=list)
    sentinel_ports: list[int] = field(default_factory=list)
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    # ------------------------------------------------------------------ addresses
    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}/0"

    def node(self, port: int) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=2)

    def master_port(self) -> int:
        """The master's port as the sentinels that answer see it (a majority must agree)."""
        votes: dict[int, int] = {}
        for port in self.sentinel_ports:
            try:
                with self.node(port) as sentinel:
                    _host, master = sentinel.execute_command("SENTINEL", "get-master-addr-by-name", MASTER_NAME)
                votes[int(master)] = votes.get(int(master), 0) + 1
            except Exception:
                continue
        best = max(votes, key=lambda p: votes[p]) if votes else 0
        if votes.get(best, 0) < 2:
            raise RuntimeError(f"no two sentinels agree on a master: {votes}")
        return best

    # ------------------------------------------------------------------ processes
    def _spawn(self, port: int, conf: str, *, sentinel: bool) -> None:
        workdir = self.root / str(port)
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / ("sentinel.conf" if sentinel else "redis.conf")
        path.write_text(f"port {port}\nbind 127.0.0.1\ndir {workdir}\nlogfile {workdir / 'log'}\n"
                        "save \"\"\nappendonly no\n" + conf, encoding="utf-8")
        argv = [self.server, str(path)] + (["--sentinel"] if sentinel else [])
        self.procs[port] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL, start_new_session=True)

    def start(self, timeout: float = 30.0) -> "SentinelCluster":
        master, replica = free_port(), free_port()
        self.redis_ports = [master, replica]
        self._spawn(master, "", sentinel=False)
        self._spawn(replica, f"replicaof 127.0.0.1 {master}\n", sentinel=False)
        for _ in range(3):
            port = free_port()
            self.sentinel_ports.append(port)
            # Sentinels rewrite their config file: each has its own.
            self._spawn(port, f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master} 2\n"
                              f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
                              f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
                              f"sentinel parallel-syncs {MASTER_NAME} 1\n", sentinel=True)
        self._wait(lambda: self._ready(master), timeout, "the replica to sync and the sentinels to see each other")
        return self

    def _ready(self, master: int) -> bool:
        try:
            with self.node(self.redis_ports[1]) as replica:
                if replica.info("replication").get("master_link_status") != "up":
                    return False
            for port in self.sentinel_ports:
                with self.node(port) as sentinel:
                    state = sentinel.execute_command("SENTINEL", "master", MASTER_NAME)
                    fields = dict(zip(state[::2], state[1::2])) if isinstance(state, list) else state
                    fields = {_text(k): _text(v) for k, v in fields.items()}
                    if int(fields["num-slaves"]) < 1 or int(fields["num-other-sentinels"]) < 2:
                        return False
                    if int(fields["port"]) != master:
                        return False
            return True
        except Exception:
            return False

    def kill_master(self) -> int:
        """SIGKILL the current master (no goodbye, no final write); returns its port."""
        port = self.master_port()
        proc = self.procs[port]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        return port

    def wait_for_failover(self, old_port: int, timeout: float = 60.0) -> int:
        """Wait until the sentinels name another master and it accepts writes; its port."""
        def promoted() -> bool:
            try:
                port = self.master_port()
                if port == old_port:
                    return False
                with self.node(port) as node:
                    return node.info("replication").get("role") == "master"
            except Exception:
                return False

        self._wait(promoted, timeout, "the sentinels to promote the replica")
        return self.master_port()

    def _wait(self, predicate: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            for port, proc in self.procs.items():
                if proc.poll() is not None and port not in self._killed():
                    pytest.fail(f"redis-server on port {port} exited with {proc.returncode}: {self.log(port)[-2000:]}",
                                pytrace=False)
            time.sleep(0.1)
        logs = "\n".join(f"--- {port}\n{self.log(port)[-1500:]}" for port in self.procs)
        pytest.fail(f"timed out after {timeout}s waiting for {what}\n{logs}", pytrace=False)

    def _killed(self) -> set[int]:
        return {port for port, proc in self.procs.items() if proc.returncode == -signal.SIGKILL}

    def log(self, port: int) -> str:
        path = self.root / str(port) / "log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def redis_server() -> str:
    """redis-server that can run as a sentinel (``--sentinel``)."""
    server = shutil.which("redis-server")
    if server is None:
        service_missing("redis-server (for the Sentinel tests)")
    assert server is not None
    probe = subprocess.run([server, "--version"], capture_output=True, text=True, timeout=10)
    if probe.returncode != 0:
        service_missing(f"a working redis-server ({server} --version exited {probe.returncode})")
    return server


@pytest.fixture
def sentinel_cluster(tmp_path: Path) -> Iterator[SentinelCluster]:
    cluster = SentinelCluster(root=tmp_path / "sentinel", server=redis_server())
    try:
        yield cluster.start()
    finally:
        cluster.stop()
