"""The chaos run's own Redis (restartable, never the shared one) and its database connection killer."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import sqlalchemy as sa


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """A ``redis-server`` on a free loopback port, without persistence, that the run may restart.

    ``restart(keep_data=True)`` saves a snapshot first (SAVE) and the new server loads it;
    ``restart(keep_data=False)`` loses every key (queued and delayed messages, locks, rate limits).
    """

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed")
        self.binary, self.workdir = binary, workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = {"kept_data": 0, "lost_data": 0}

    def start(self) -> None:
        log = open(self.workdir / "redis.log", "ab")
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--dbfilename", "dump.rdb", "--protected-mode", "yes"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self._wait()

    def _wait(self, timeout: float = 15.0) -> None:
        import redis

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                client = redis.Redis.from_url(self.url, socket_timeout=1)
                try:
                    if client.ping():
                        return
                finally:
                    client.close()
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError(f"private redis-server on port {self.port} did not answer")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def restart(self, *, keep_data: bool, down_s: float = 1.0) -> None:
        import redis

        dump = self.workdir / "dump.rdb"
        if keep_data:
            client = redis.Redis.from_url(self.url, socket_timeout=10)
            try:
                client.save()
            finally:
                client.close()
        elif dump.exists():
            dump.unlink()
        self.kill()
        time.sleep(down_s)
        self.start()
        self.restarts["kept_data" if keep_data else "lost_data"] += 1

    def stop(self) -> None:
        self.kill()


class ConnectionKiller:
    """``pg_terminate_backend`` of the chaos database's backends opened by keyrotor's processes
    (``application_name`` starting with ``prefix``), never another database's."""

    def __init__(self, admin_url: str, database: str, prefix: str) -> None:
        self.engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
        self.database, self.prefix = database, prefix
        self.terminated = 0
        self.passes = 0

    def kill_all(self) -> int:
        with self.engine.connect() as conn:
            killed = conn.execute(sa.text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = :db AND application_name LIKE :prefix AND pid <> pg_backend_pid()"),
                {"db": self.database, "prefix": self.prefix + "%"}).scalar_one()
        self.terminated += int(killed)
        self.passes += 1
        return int(killed)

    def close(self) -> None:
        self.engine.dispose()
