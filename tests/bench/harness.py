"""Shared harness of `make bench`: the services in their own processes, counters read from outside
the worker, paired trials and their summary, the JSON report.

Everything the benchmark measures runs in processes of its own: ``bao server -dev`` (OpenBao, with a
file audit device that counts its requests), the provider stand-in (``keyrotor sandbox provider``,
whose ``/_sandbox/stats`` counts its requests by route and status), and ``keyrotor worker``
subprocesses whose CPU is read from ``/proc/<pid>/stat`` of the whole process tree. PostgreSQL is a
throw-away database created here and dropped at the end; Redis keys live under a namespace of
this run and are deleted at the end.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import httpx
import sqlalchemy as sa
import yaml

REPO = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("KEYROTOR_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
PG_ADMIN_URL = os.environ.get("KEYROTOR_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
TOKEN_ENV = "KR_BENCH_PROVIDER_TOKEN"
PROVIDER = "bench"
FIELD = "api_key"
TERMINAL = ("completed", "failed", "rolled_back", "needs_attention", "cancelled")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, str(default)))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- statistics
def summary(values: list[float]) -> dict[str, float]:
    """min / median / max of the trials (the figures every table prints)."""
    if not values:
        return {"min": float("nan"), "median": float("nan"), "max": float("nan")}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def fmt3(values: list[float], spec: str = ".1f") -> str:
    s = summary(values)
    return f"{s['min']:{spec}} / {s['median']:{spec}} / {s['max']:{spec}}"


@dataclass
class Figure:
    """One printed line: the measured value against its baseline, per trial, and their ratio."""

    name: str
    unit: str
    measured: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)
    baseline_label: str = ""
    note: str = ""

    @property
    def ratios(self) -> list[float]:
        return [m / b for m, b in zip(self.measured, self.baseline) if b]

    def row(self) -> str:
        base = fmt3(self.baseline) if self.baseline else "—"
        ratio = fmt3(self.ratios, ".2f") + "x" if self.baseline else "—"
        return f"{self.name:<44} {fmt3(self.measured):>24} {self.unit:<12} | {base:>24} {ratio:>22}  {self.baseline_label}"

    def as_json(self) -> dict[str, Any]:
        return {"unit": self.unit, "measured": self.measured, "measured_summary": summary(self.measured),
                "baseline": self.baseline, "baseline_summary": summary(self.baseline) if self.baseline else None,
                "baseline_label": self.baseline_label, "ratio_summary": summary(self.ratios) if self.baseline else None,
                "note": self.note}


def print_table(title: str, figures: list[Figure]) -> None:
    print(f"\n=== {title} (min / median / max of {max((len(f.measured) for f in figures), default=0)} trials) ===")
    print(f"{'figure':<44} {'measured':>24} {'unit':<12} | {'baseline':>24} {'ratio measured/baseline':>22}")
    for f in figures:
        print(f.row())
        if f.note:
            print(f"{'':<6}{f.note}")
    sys.stdout.flush()


def machine() -> dict[str, Any]:
    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu_model": model or platform.processor(), "python": platform.python_version(),
            "loadavg": os.getloadavg(), "kernel": platform.release()}


def git_head() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# --------------------------------------------------------------------------- processes
def tree_pids(root: int) -> list[int]:
    """``root`` and every descendant (from /proc/<pid>/task/*/children)."""
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                todo.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                pass
    return pids


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2:].split()  # the comm field may hold spaces


def tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system) of ``root``'s live process tree, plus its reaped children's."""
    total = 0
    for pid in tree_pids(root):
        try:
            f = _stat_fields(pid)
        except OSError:
            continue
        total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])  # utime stime cutime cstime
    return total / CLK_TCK


def tree_rss_kib(root: int) -> int:
    total = 0
    for pid in tree_pids(root):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[Any], timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def use_this_tree() -> None:
    """Every process the bench starts runs the code of the tree it runs from: this tree first on
    ``PYTHONPATH``. An entry point does not put its working directory on the path, so from another
    worktree sharing this virtualenv (a before/after comparison) the editable install would
    otherwise load the ``worker`` package it was installed from."""
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))


def keyrotor_command(*args: str) -> list[str]:
    """The installed ``keyrotor`` entry point (what a deployment runs), else ``python -m``."""
    exe = Path(sys.executable).with_name("keyrotor")
    return [str(exe), *args] if exe.exists() else [sys.executable, "-m", "worker.cli.main", *args]


# --------------------------------------------------------------------------- OpenBao
@dataclass
class Vault:
    addr: str
    token: str
    audit_file: Path
    stop: Callable[[], None]

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.addr, headers={"X-Vault-Token": self.token}, timeout=30)

    def new_mount(self) -> str:
        mount = f"bench-{uuid.uuid4().hex[:8]}"
        with self.client() as c:
            c.post(f"/v1/sys/mounts/{mount}", json={"type": "kv", "options": {"version": "2"}}).raise_for_status()
        return mount

    def requests_seen(self) -> int:
        """Requests OpenBao has audited so far (one ``"type":"request"`` line each)."""
        try:
            with open(self.audit_file, "rb") as f:
                return sum(1 for line in f if b'"type":"request"' in line)
        except FileNotFoundError:
            return 0


def start_vault(stack: ExitStack, workdir: Path) -> Vault:
    """A ``bao server -dev`` of this run, with a file audit device (declared in a config file:
    OpenBao enables none over its API) that counts every request it serves; or the Vault that
    VAULT_ADDR/VAULT_TOKEN name, whose requests are then not counted."""
    from keyrotor_sandbox.openbao import INSTALL_HINT, find_bao, start_dev_server

    audit = workdir / "openbao-audit.log"
    addr, token = os.environ.get("VAULT_ADDR"), os.environ.get("VAULT_TOKEN")
    if addr:
        return Vault(addr=addr.rstrip("/"), token=token or "", audit_file=audit, stop=lambda: None)
    if find_bao() is None:
        raise SystemExit(f"bench: {INSTALL_HINT}")
    config = workdir / "openbao-bench.hcl"
    config.write_text('audit "file" "bench" {\n  options {\n    file_path = %s\n  }\n}\n' % json.dumps(str(audit)),
                      encoding="utf-8")
    server = start_dev_server(extra_args=[f"-config={config}"])
    stack.callback(server.stop)
    return Vault(addr=server.addr, token=server.token, audit_file=audit, stop=server.stop)


# --------------------------------------------------------------------------- provider stand-in
@dataclass
class Provider:
    url: str
    admin_token: str
    proc: subprocess.Popen[bytes]

    def _client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.admin_token}"}, timeout=30)

    def stats(self) -> dict[str, Any]:
        with self._client() as c:
            return dict(c.get("/_sandbox/stats").json())

    def seed(self, names: list[str]) -> list[dict[str, Any]]:
        with self._client() as c:
            return [c.post("/_sandbox/keys", json={"name": n}).json() for n in names]


def start_provider(stack: ExitStack, workdir: Path, *, rate_limit: str = "") -> Provider:
    """``keyrotor sandbox provider`` on a free port in its own process; its URL from the ready line."""
    token = f"admin-{uuid.uuid4().hex}"
    log_file = open(workdir / f"provider-{uuid.uuid4().hex[:4]}.log", "w+b")
    stack.callback(log_file.close)
    args = ["sandbox", "provider", "--port", "0", "--admin-token", token]
    if rate_limit:
        args += ["--rate-limit", rate_limit]
    proc = subprocess.Popen(keyrotor_command(*args), stdout=subprocess.PIPE, stderr=log_file, stdin=subprocess.DEVNULL,
                            start_new_session=True, cwd=REPO)
    stack.callback(stop_process, proc)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    match = re.search(r"https?://[\d.]+:\d+", line)
    if not match:
        log_file.seek(0)
        raise RuntimeError(f"provider stand-in did not start: {line!r} {log_file.read()[-2000:]!r}")
    return Provider(url=match.group(0), admin_token=token, proc=proc)


def provider_counts(stats: dict[str, Any]) -> dict[str, int]:
    """Requests by route, plus the 429 answers, from a ``/_sandbox/stats`` answer."""
    routes = stats.get("routes", {})
    out = {route: sum(per.values()) for route, per in routes.items()}
    out["total"] = int(stats.get("requests", 0))
    out["429"] = sum(per.get("429", 0) for per in routes.values())
    out["ok"] = sum(n for per in routes.values() for status, n in per.items() if status.startswith("2"))
    # Every answer but a 429 counts against the provider's limit: a 401 (retire's check that the
    # old key is rejected) is as much a request as a 200.
    out["answered"] = sum(n for per in routes.values() for status, n in per.items() if status != "429")
    return out


def diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)}


# --------------------------------------------------------------------------- PostgreSQL
@dataclass
class Database:
    url: str
    name: str

    def engine(self, **kw: Any) -> sa.Engine:
        return sa.create_engine(self.url, **kw)

    def activity(self) -> dict[str, int]:
        """Transactions, new connections and rows of this database since it was created
        (``pg_stat_database``; PostgreSQL 14+ for ``sessions``). Backends report their counters
        when idle, at most once a second: read it after a pause (``settle``)."""
        admin = sa.create_engine(PG_ADMIN_URL, poolclass=sa.pool.NullPool)
        try:
            with admin.connect() as c:
                row = c.execute(sa.text(
                    "SELECT xact_commit, xact_rollback, sessions, tup_returned, tup_fetched, tup_inserted, tup_updated, "
                    "tup_deleted FROM pg_stat_database WHERE datname = :d"), {"d": self.name}).one()
        finally:
            admin.dispose()
        return {"commits": row[0], "rollbacks": row[1], "sessions": row[2], "tup_returned": row[3], "tup_fetched": row[4],
                "tup_written": row[5] + row[6] + row[7]}


def create_database(stack: ExitStack) -> Database:
    from worker.db.migrate import upgrade

    name = f"keyrotor_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    stack.callback(drop)
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    upgrade(url)
    return Database(url=url, name=name)


# --------------------------------------------------------------------------- Redis
def redis_commands_served() -> int:
    """Commands the Redis server has served since it started (``INFO stats``)."""
    from worker.redis_conn import redis_client

    client = redis_client(REDIS_URL, socket_timeout=10)
    try:
        return int(client.info("stats")["total_commands_processed"])
    finally:
        client.close()


def redis_cleanup(stack: ExitStack, namespace: str) -> None:
    from worker.redis_conn import redis_client

    def clean() -> None:
        client = redis_client(REDIS_URL, socket_timeout=10)
        for key in client.scan_iter(match=f"{namespace}*", count=1000):
            client.delete(key)
        client.close()

    stack.callback(clean)


# --------------------------------------------------------------------------- the world of one figure
@dataclass
class World:
    """Services and an inventory of ``keys`` keys (one vault_copy integration each, grace 0),
    each holding a live seeded credential."""

    workdir: Path
    vault: Vault
    provider: Provider
    db: Database
    namespace: str
    mount: str
    keys: list[str]
    stack: ExitStack
    engine: sa.Engine
    broker: Any = None
    polls: int = 0  # this process's read transactions on the database while waiting (subtracted from counts)

    def path(self, i: int) -> str:
        return f"apps/bench/{i:05d}"

    def env(self, metrics_port: int = 0) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYROTOR_", "VAULT_", "PYTEST_"))}
        env.update({
            "KEYROTOR_DATABASE_URL": self.db.url, "KEYROTOR_REDIS_URL": REDIS_URL,
            "KEYROTOR_QUEUE_NAMESPACE": self.namespace, "VAULT_ADDR": self.vault.addr, "VAULT_TOKEN": self.vault.token,
            "KEYROTOR_VAULT_MOUNT": self.mount, "KEYROTOR_METRICS_PORT": str(metrics_port),
            "KEYROTOR_LOG_LEVEL": os.environ.get("KEYROTOR_BENCH_LOG_LEVEL", "INFO"), "KEYROTOR_LOG_FORMAT": "json",
            TOKEN_ENV: self.provider.admin_token, "PYTHONUNBUFFERED": "1",
        })
        return env

    def start_worker(self, *, processes: int = 1, threads: int = 8, name: str = "worker") -> "WorkerProcess":
        port = free_port()
        out = open(self.workdir / f"{name}-{uuid.uuid4().hex[:4]}.log", "wb")
        self.stack.callback(out.close)
        env = self.env(port)
        command = keyrotor_command("worker", "-p", str(processes), "-t", str(threads))
        profiling = os.environ.get("KEYROTOR_BENCH_PROFILE") == "1"
        if profiling:
            # tests/bench/profile_hook: a sampling profiler started in every worker process by
            # sitecustomize (the children are spawned, so wrapping the parent would miss them).
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).with_name("profile_hook")),
                                                               env.get("PYTHONPATH", "")]))
            env["KEYROTOR_BENCH_PROFILE_DIR"] = str(self.workdir / "profile")
        started = time.monotonic()
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        handle = WorkerProcess(proc=proc, metrics_port=port, log_path=Path(out.name), spawned=started)
        log(f"  {name}: pid {proc.pid}, -p {processes} -t {threads}, metrics on port {port}")
        self.stack.callback(handle.stop)
        handle.wait_ready(self.namespace, processes)
        return handle

    def producer(self) -> Any:
        """This process's broker on the namespace (a producer, as `keyrotor rotate` is)."""
        if self.broker is None:
            from worker.runtime.broker import make_redis_broker, reset_broker, setup_broker

            self.broker = setup_broker(broker=make_redis_broker(REDIS_URL, self.namespace))
            self.stack.callback(reset_broker)
            self.stack.callback(self.broker.close)
        return self.broker

    def request(self, names: list[str], tag: str) -> list[str]:
        """Create one run per key (as `keyrotor rotate` does); not enqueued yet."""
        from worker.db.session import session_scope
        from worker.pipeline.requests import request_rotation

        ids = []
        with session_scope(self.engine) as session:
            for name in names:
                run, created = request_rotation(session, key_name=name, reason="bench", trigger="manual",
                                                requested_by="bench", idempotency_key=f"{tag}-{name}-{uuid.uuid4().hex[:8]}")
                assert created, name
                ids.append(run.id)
        # As autovacuum keeps a long-lived database: a table never analyzed has no statistics, and
        # the planner then took the run's state index for ``WHERE id = … AND state = …`` (every
        # run in that state read per statement, about 800 rows per rotation at 300 keys).
        with self.engine.connect() as c:
            c.execute(sa.text("ANALYZE rotation_run, audit_event, key_version, managed_key, sink_delivery"))
            c.commit()
        return ids

    def enqueue(self, ids: list[str]) -> None:
        from sqlmodel import col, select

        from worker.db.models import RotationRun
        from worker.db.session import session_scope
        from worker.pipeline.outbox import enqueue_run
        from worker.queues import batched_sends

        self.producer()
        # As `keyrotor rotate --all` and the detection job send them: the runs read in one query,
        # their first steps sent in one round trip. (One read and one send per run took CPU from
        # the worker: this process shares the machine with it.)
        with batched_sends(), session_scope(self.engine) as session:
            runs = {run.id: run for run in session.exec(select(RotationRun).where(col(RotationRun.id).in_(ids)))}
            assert len(runs) == len(ids), f"{len(ids) - len(runs)} runs missing"
            for run_id in ids:
                enqueue_run(runs[run_id])

    def wait_finished(self, ids: list[str], timeout: float, *, poll_s: float = 0.05) -> dict[str, str]:
        """Poll until every run has ended (every ``poll_s``, a one-row count: reading every run's row
        every 20 ms cost this process, which shares the machine with the worker, a tenth of a
        core at 300 keys); their end states."""
        deadline = time.monotonic() + timeout
        params = {"ids": ids}
        while True:
            row = self._count_open(ids)
            if row.open == 0 and row.known == len(ids):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{row.open} of {len(ids)} runs still open after {timeout:.0f}s")
            time.sleep(poll_s)
        with self.engine.connect() as c:
            rows = c.execute(sa.text("SELECT id, state FROM rotation_run WHERE id = ANY(:ids)"), params).all()
        self.polls += 1
        return {r.id: r.state for r in rows}

    def _count_open(self, ids: list[str]) -> Any:
        # The ids as one comma-joined string: binding a list of N strings every poll was about
        # half of this process's CPU while the worker ran (1 ms per rotation at 300 keys), CPU
        # the worker could not have on the machine they share.
        count = sa.text("SELECT count(*) FILTER (WHERE finished_at IS NULL) AS open, count(*) AS known "
                        "FROM rotation_run WHERE id = ANY(string_to_array(:ids, ','))")
        with self.engine.connect() as c:
            row = c.execute(count, {"ids": ",".join(ids)}).one()
        self.polls += 1
        return row

    def rows_per_poll(self, ids: list[str], polls: int = 5) -> float:
        """Rows PostgreSQL reads (``tup_returned``) for one completion poll over ``ids``, measured
        on the idle database (the polls share ``pg_stat_database`` with the worker's reads)."""
        before = self.db.activity()
        for _ in range(polls):
            self._count_open(ids)
        settle()
        return (self.db.activity()["tup_returned"] - before["tup_returned"]) / polls


def inventory(provider_url: str, mount: str, count: int, *, rate_limit: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    from keyrotor_sandbox.provider import standin_provider_spec

    spec = standin_provider_spec(provider_url, admin_token_ref={"env": TOKEN_ENV},
                                 rate_limit=rate_limit or {"requests": 100_000, "per": "1s"},
                                 activation={"poll_interval": "1s", "timeout": "30s"})
    return {
        "version": 1,
        "policies": {"bench": {"expiry_lead_time": "7d", "max_age": "90d", "grace_period": 0}},
        "providers": {PROVIDER: spec},
        "integrations": {"copy": {"kind": "vault_copy", "mount": mount, "path": "copies/{key_slug}", "field": "token"}},
        "keys": {f"bench/key-{i:05d}": {"provider": PROVIDER, "credential_type": "api_key", "owner": "bench@example.com",
                                         "vault": {"mount": mount, "path": f"apps/bench/{i:05d}", "field": FIELD},
                                         "policy": "bench", "integrations": ["copy"]}
                 for i in range(count)},
    }


def build_world(stack: ExitStack, workdir: Path, vault: Vault, *, keys: int, rate_limit: int = 0) -> World:
    """A database, a KV mount, a provider stand-in and ``keys`` seeded keys, applied as an inventory."""
    from concurrent.futures import ThreadPoolExecutor

    from worker.db.session import session_scope
    from worker.inventory.apply import apply_inventory
    from worker.inventory.loader import load_inventory

    provider = start_provider(stack, workdir, rate_limit=f"{rate_limit}/1s" if rate_limit else "")
    db = create_database(stack)
    namespace = f"krbench-{uuid.uuid4().hex[:8]}"
    redis_cleanup(stack, namespace)
    mount = vault.new_mount()
    stack.callback(lambda: httpx.delete(f"{vault.addr}/v1/sys/mounts/{mount}", headers={"X-Vault-Token": vault.token}))
    inv = inventory(provider.url, mount, keys, rate_limit={"requests": rate_limit, "per": "1s"} if rate_limit else None)
    path = workdir / f"inventory-{uuid.uuid4().hex[:4]}.yaml"
    path.write_text(yaml.safe_dump(inv), encoding="utf-8")
    seeded = provider.seed([f"seed-{i}" for i in range(keys)])  # the control API is not rate limited

    def store(i: int) -> None:  # each key's first credential in Vault, in the shape the worker writes
        from worker.secret import Secret

        _store().promote(mount, f"apps/bench/{i:05d}", FIELD, Secret(seeded[i]["apiKey"]),
                         provider_key_id=seeded[i]["id"], expected_version=None)

    def _store() -> Any:
        from worker.settings import load_settings
        from worker.vault.store import VaultStore

        return VaultStore.from_settings(load_settings(VAULT_ADDR=vault.addr, VAULT_TOKEN=vault.token, vault_mount=mount))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(store, range(keys)))
    engine = sa.create_engine(db.url, pool_size=2)
    stack.callback(engine.dispose)
    with session_scope(engine) as session:
        apply_inventory(session, load_inventory(path), actor="bench")
    return World(workdir=workdir, vault=vault, provider=provider, db=db, namespace=namespace, mount=mount,
                 keys=sorted(inv["keys"]), stack=stack, engine=engine)


# --------------------------------------------------------------------------- worker processes
@dataclass
class WorkerProcess:
    proc: subprocess.Popen[bytes]
    metrics_port: int
    log_path: Path
    spawned: float
    ready_after_s: float = 0.0

    def wait_ready(self, namespace: str, processes: int, timeout: float = 60.0) -> None:
        """Ready = every worker process has sent its first heartbeat to the broker (it consumes)."""
        from worker.redis_conn import redis_client

        client = redis_client(REDIS_URL, socket_timeout=10)
        key = f"{namespace}:__heartbeats__"
        before = set(client.zrange(key, 0, -1))
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"worker exited with {self.proc.returncode}: {self.log_path.read_text()[-3000:]}")
                if len(set(client.zrange(key, 0, -1)) - before) >= processes:
                    self.ready_after_s = time.monotonic() - self.spawned
                    return
                time.sleep(0.01)
        finally:
            client.close()
        raise RuntimeError(f"worker not consuming after {timeout}s: {self.log_path.read_text()[-3000:]}")

    def cpu_s(self) -> float:
        return tree_cpu_s(self.proc.pid)

    def log_offset(self) -> int:
        return self.log_path.stat().st_size

    def log_problems(self, since: int = 0) -> dict[str, int]:
        """What went wrong in the worker's log after byte ``since``: steps that failed for good
        (``run.failed_step``: a run's end state can hide them, as a compensated run ends too),
        Python warnings (SQLAlchemy's among them) and error lines."""
        counts = {"failed_steps": 0, "python_warnings": 0, "errors": 0}
        with open(self.log_path, "rb") as log_file:
            log_file.seek(since)
            for line in log_file:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if entry.get("event") == "run.failed_step":
                    counts["failed_steps"] += 1
                if entry.get("logger") == "py.warnings":
                    counts["python_warnings"] += 1
                if entry.get("level") in ("error", "critical"):
                    counts["errors"] += 1
        return counts

    def rss_kib(self) -> int:
        return tree_rss_kib(self.proc.pid)

    def metrics(self) -> dict[str, float]:
        """The worker's /metrics (all processes summed by the parent), sample name+labels → value."""
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
        return out

    def stop(self) -> None:
        stop_process(self.proc, timeout=20)


def metric_sum(metrics: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in metrics.items() if k.startswith(prefix))


def by_label(metrics: dict[str, float], prefix: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if k.startswith(prefix):
            m = re.search(label + r'="([^"]*)"', k)
            if m:
                out[m.group(1)] = out.get(m.group(1), 0.0) + v
    return out


# --------------------------------------------------------------------------- report
@dataclass
class Report:
    path: Path
    data: dict[str, Any] = field(default_factory=dict)

    def add(self, section: str, payload: dict[str, Any]) -> None:
        payload["loadavg_after"] = os.getloadavg()  # the machine is shared: how busy it was
        self.data.setdefault("figures", {})[section] = payload
        self.write()

    def write(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=2, default=str) + "\n", encoding="utf-8")


def workdir(stack: ExitStack) -> Path:
    path = Path(tempfile.mkdtemp(prefix="keyrotor-bench-"))
    if os.environ.get("KEYROTOR_BENCH_KEEP") != "1":
        stack.callback(shutil.rmtree, path, True)
    return path


#: How long a PostgreSQL backend may keep its statistics before ``pg_stat_database`` shows them:
#: an idle backend reports at once unless it reported less than a second ago, and then only after
#: 10 s idle (PGSTAT_MIN_INTERVAL and PGSTAT_IDLE_INTERVAL in PostgreSQL 15's pgstat.c), plus a margin.
STATS_FLUSH_S = 10.5


def settle() -> None:
    """Wait until every idle backend (the worker's pooled connections, this process's) has
    reported its statistics. Waiting 1.2 s, as the bench did until the fifteenth round, left the
    last second of some backends' counts to land in the next reading: a trial's transactions per
    rotation moved by a tenth, and its rows read once came out 0 (most likely a poll measured with
    another backend's late report in it)."""
    time.sleep(STATS_FLUSH_S)


def iter_trials(n: int) -> Iterator[int]:
    for i in range(n):
        log(f"  trial {i + 1}/{n} (load average {os.getloadavg()[0]:.2f})")
        yield i
