"""Fixtures for the end-to-end and chaos tests.

The world of one test: PostgreSQL (``pg_url``), a Redis namespace (``redis_namespace``), the Vault
stand-in with a fresh KV v2 mount, a provider stand-in and a consumer stand-in over real HTTP in
this process, an inventory applied to the database, and keyrotor workers started as
*subprocesses* (``keyrotor worker``) with KEYROTOR_* / VAULT_* pointing at all of it.

Everything is observed from the outside: the provider stand-in knows every key it minted, the
consumer counts its failed probes, a monitor thread samples "does the key Vault serves work at the
provider?" while the rotation runs, and the leak scanners read what the service wrote (worker
logs, every Redis key of the namespace, every row of every table).

Every subprocess is killed in teardown; waits are bounded and print the run's audit trail when
they time out.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import pytest
import sqlalchemy as sa
import yaml
from sqlmodel import col, select

from worker.db.models import AuditEvent, KeyVersion, RotationRun, SinkDelivery
from worker.db.session import make_engine, session_scope
from worker.secret import Secret, fingerprint

REPO = Path(__file__).resolve().parents[2]
PROVIDER_TOKEN_ENV = "KR_E2E_PROVIDER_TOKEN"
WEBHOOK_SECRET_ENV = "KR_E2E_WEBHOOK_SECRET"
KEY_NAME = "e2e/app"
KEY_PATH = "apps/e2e/alloy"
KEY_FIELD = "api_key"
COPY_PATH = "copies/e2e-app"        # what "copies/{key_slug}" renders to for KEY_NAME
COPY_FIELD = "token"
PROVIDER = "standin"
CONSUMER_CHECK_PATH = "/api/user/me?from=consumer"
TERMINAL = {"completed", "failed", "rolled_back", "needs_attention", "cancelled"}

#: Launches the pipeline's worker when the `keyrotor worker` command is not there yet.
_FALLBACK_WORKER = (
    "import sys\n"
    "from worker.log import configure_logging\n"
    "from worker.settings import get_settings\n"
    "s = get_settings()\n"
    "configure_logging(s.log_level, s.log_format)\n"
    "from worker.runtime.workers import run_worker\n"
    "run_worker(processes=int(sys.argv[1]), threads=int(sys.argv[2]))\n"
)
_worker_cli: Optional[bool] = None


def worker_command(processes: int = 1, threads: int = 2) -> list[str]:
    """``keyrotor worker --processes P --threads T`` (or the pipeline's own entry point)."""
    global _worker_cli
    if _worker_cli is None:
        probe = subprocess.run([sys.executable, "-m", "worker.cli.main", "worker", "--help"], cwd=REPO,
                               capture_output=True, text=True, timeout=60)
        _worker_cli = probe.returncode == 0 and "--threads" in probe.stdout
    if _worker_cli:
        return [sys.executable, "-m", "worker.cli.main", "worker", "--processes", str(processes),
                "--threads", str(threads)]
    return [sys.executable, "-c", _FALLBACK_WORKER, str(processes), str(threads)]


# --------------------------------------------------------------------------- worker subprocesses
@dataclass
class WorkerProcess:
    name: str
    proc: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the worker's whole process group (it may have spawned children)."""
        if self.alive():
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
        if sig == signal.SIGKILL:
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if not self.alive():
            return
        self.kill(signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)

    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace") + self.stderr_path.read_text(errors="replace")


# --------------------------------------------------------------------------- faults aimed at run keys
@dataclass
class RunKeyFault:
    status: Optional[int]
    delay: float
    skip: int        # let this many matching requests through first
    count: int       # then answer this many with the fault


class RunKeyFaults:
    """Wraps the provider stand-in's app with health-call faults that hit only keyrotor's own calls
    made with a key minted for a run (named ``keyrotor-…``). The stand-in's own faults match by
    route, so the consumer's probes would consume them; the consumer stand-in calls
    ``CONSUMER_CHECK_PATH`` (same route, a marker in the query), which these faults leave alone —
    a test can inject a failure and still prove the consumer saw no outage."""

    def __init__(self, app: Any, state: Any) -> None:
        self.app, self.state = app, state
        self.faults: list[RunKeyFault] = []
        self.hits = 0
        self.slow: dict[str, tuple[float, int]] = {}
        self.requests: list[tuple[float, str, int, bool, str]] = []  # (monotonic, route, status, from consumer, path)
        self.lock = threading.Lock()

    def add_check_fault(self, *, status: Optional[int] = None, delay: float = 0.0, skip: int = 0, count: int = 1) -> None:
        with self.lock:
            self.faults.append(RunKeyFault(status, delay, skip, count))

    def _take(self) -> Optional[RunKeyFault]:
        with self.lock:
            for fault in self.faults:
                if fault.skip > 0:
                    fault.skip -= 1
                    return None
                if fault.count > 0:
                    fault.count -= 1
                    self.hits += 1
                    return fault
        return None

    def add_slow_answer(self, route: str, *, delay: float, count: int = 1) -> None:
        """Answer the next ``count`` requests on ``route`` computed at arrival, sent ``delay`` s
        later (the stand-in's own delay fault sleeps *before* computing the answer)."""
        with self.lock:
            self.slow[route] = (delay, count)

    def __call__(self, request: Any) -> Any:
        response = self._answer(request)
        route = _route(request)
        with self.lock:
            delay, count = self.slow.get(route, (0.0, 0))
            if count > 0:
                self.slow[route] = (delay, count - 1)
        if count > 0:
            time.sleep(delay)
        with self.lock:
            self.requests.append((time.monotonic(), _route(request), response.status,
                                  request.query.get("from") == "consumer", request.path))
        return response

    def _answer(self, request: Any) -> Any:
        from keyrotor_sandbox.standin_http import Response

        if request.method == "GET" and request.path.rstrip("/") == "/api/user/me":
            key = self.state.find_secret(request.bearer())
            if key is not None and key.name.startswith("keyrotor-") and request.query.get("from") != "consumer":
                fault = self._take()
                if fault is not None:
                    if fault.delay:
                        time.sleep(fault.delay)
                    if fault.status is not None:
                        self.state.count("check", fault.status)
                        return Response.json(fault.status, {"errors": [{"message": f"injected {fault.status}"}]})
        return self.app(request)

    def calls(self, route: str, path_suffix: str = "") -> list[tuple[float, int]]:
        """(monotonic time, status) of keyrotor's requests on ``route`` (consumer probes excluded),
        optionally only those whose path ends with ``path_suffix`` (e.g. a key id to revoke)."""
        with self.lock:
            return [(t, status) for t, r, status, consumer, path in self.requests
                    if r == route and not consumer and path.endswith(path_suffix)]


def _route(request: Any) -> str:
    path = request.path.rstrip("/")
    if path == "/api/api-key":
        return {"POST": "issue", "GET": "list"}.get(request.method, "other")
    if path.startswith("/api/api-key/") and request.method == "DELETE":
        return "revoke"
    if path == "/api/user/me":
        return "check"
    return "control" if path.startswith("/_sandbox") else "other"


def start_provider(activation_delay: float) -> tuple[Any, RunKeyFaults]:
    """The provider stand-in (``ProviderHandle``) behind ``RunKeyFaults``."""
    from keyrotor_sandbox.provider import ProviderApp, ProviderHandle, ProviderState
    from keyrotor_sandbox.standin_http import serve_in_thread

    state = ProviderState(admin_token="sbx-admin-" + secrets.token_urlsafe(16), activation_delay=activation_delay)
    faults = RunKeyFaults(ProviderApp(state), state)
    return ProviderHandle(serve_in_thread(faults, "127.0.0.1", 0, name="e2e-provider"), state), faults


# --------------------------------------------------------------------------- outside-in observers
@dataclass
class Monitor:
    """Samples, every ``interval`` seconds: does the key Vault serves authenticate at the provider
    (invariant 1), and since when has a given old key stopped working (its revocation time)."""

    world: "World"
    interval: float = 0.03
    samples: int = 0
    violations: list[str] = field(default_factory=list)
    watched: dict[str, Optional[datetime]] = field(default_factory=dict)   # secret → first seen dead
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: Optional[threading.Thread] = None

    def watch(self, secret: str) -> None:
        self.watched.setdefault(secret, None)

    def start(self) -> "Monitor":
        self._thread = threading.Thread(target=self._loop, name="e2e-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        import hvac

        client = hvac.Client(url=self.world.vault_addr, token=self.world.vault_token, timeout=5)
        while True:
            # One last sample once stopped: a run can end within one interval of its last effect
            # (the old key's revocation), and the world as the run left it must be seen too.
            stopping = self._stop.wait(self.interval)
            self._sample(client)
            if stopping:
                return

    def _sample(self, client: Any) -> None:
        try:
            answer = client.secrets.kv.v2.read_secret_version(path=KEY_PATH, mount_point=self.world.mount,
                                                              raise_on_deleted_version=True)
            served = answer["data"]["data"][KEY_FIELD]
        except Exception as exc:  # Vault must answer throughout
            self.violations.append(f"{datetime.now(timezone.utc).isoformat()} Vault read failed: {type(exc).__name__}")
            return
        self.samples += 1
        if not self.world.provider.is_live(served):
            self.violations.append(f"{datetime.now(timezone.utc).isoformat()} Vault serves {fingerprint(served)}, "
                                   "which the provider rejects")
        for secret, dead_since in list(self.watched.items()):
            if dead_since is None and not self.world.provider.is_live(secret):
                self.watched[secret] = datetime.now(timezone.utc)


class RedisSampler:
    """Reads every key of the namespace every ``interval`` s while a rotation runs: queue messages
    live in Redis only until they are acknowledged, so a scan at the end would miss them."""

    def __init__(self, world: "World", interval: float = 0.05) -> None:
        self.world, self.interval = world, interval
        self.seen: dict[str, set[bytes]] = {}
        self.scans = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="e2e-redis-sampler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            for name, blob in self.world.redis_dump().items():
                self.seen.setdefault(name, set()).add(blob)
            self.scans += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def blobs(self) -> dict[str, bytes]:
        return {f"{name} (sampled)": b"\n".join(sorted(values)) for name, values in self.seen.items()}


# --------------------------------------------------------------------------- the world
@dataclass
class World:
    tmp_path: Path
    db_url: str
    redis_url: str
    namespace: str
    vault_addr: str
    vault_token: str
    mount: str
    provider: Any            # keyrotor_sandbox.provider.ProviderHandle
    run_key_faults: RunKeyFaults
    consumer: Any            # keyrotor_sandbox.consumer.ConsumerHandle
    webhook_secret: str
    engine: sa.engine.Engine
    store: Any               # worker.vault.store.VaultStore (this process's view of Vault)
    seed_secret: str
    seed_key_id: str
    stack: ExitStack
    workers: list[WorkerProcess] = field(default_factory=list)
    _broker: Any = None

    # ------------------------------------------------------------------ workers
    def worker_env(self, log_level: str = "DEBUG") -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("KEYROTOR_", "VAULT_", "PYTEST_", "COV_"))}
        env.update({
            "KEYROTOR_DATABASE_URL": self.db_url,
            "KEYROTOR_REDIS_URL": self.redis_url,
            "KEYROTOR_QUEUE_NAMESPACE": self.namespace,
            "VAULT_ADDR": self.vault_addr,
            "VAULT_TOKEN": self.vault_token,
            "KEYROTOR_VAULT_MOUNT": self.mount,
            "KEYROTOR_METRICS_PORT": "0",
            "KEYROTOR_LOG_LEVEL": log_level,
            "KEYROTOR_LOG_FORMAT": "json",
            "KEYROTOR_HTTP_TIMEOUT_S": "10",
            PROVIDER_TOKEN_ENV: self.provider.admin_token,
            WEBHOOK_SECRET_ENV: self.webhook_secret,
            "PYTHONUNBUFFERED": "1",
        })
        return env

    def start_worker(self, *, threads: int = 2, log_level: str = "DEBUG", wait: bool = True) -> WorkerProcess:
        """A `keyrotor worker --processes 1 --threads N` subprocess; waits until it consumes."""
        index = len(self.workers)
        out, err = self.tmp_path / f"worker-{index}.out", self.tmp_path / f"worker-{index}.err"
        client = self.redis()
        beats_key = f"{self.namespace}:__heartbeats__"
        before = set(client.zrange(beats_key, 0, -1))
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            proc = subprocess.Popen(worker_command(1, threads), cwd=REPO, env=self.worker_env(log_level),
                                    stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, start_new_session=True)
        handle = WorkerProcess(f"worker-{index}", proc, out, err)
        self.workers.append(handle)
        if wait:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if not handle.alive():
                    client.close()
                    pytest.fail(f"{handle.name} exited with {proc.returncode}:\n{handle.output()[-3000:]}")
                if set(client.zrange(beats_key, 0, -1)) - before:
                    break
                time.sleep(0.05)
            else:
                client.close()
                pytest.fail(f"{handle.name} did not start consuming within 30s:\n{handle.output()[-3000:]}")
        client.close()
        return handle

    def worker_logs(self) -> str:
        return "\n".join(w.output() for w in self.workers)

    def redis(self) -> Any:
        """A client of the world's Redis (``redis_url`` may name a Sentinel deployment)."""
        from worker.redis_conn import redis_client

        return redis_client(self.redis_url, socket_timeout=10)

    # ------------------------------------------------------------------ producing
    @property
    def broker(self) -> Any:
        """This process's Redis broker on the test namespace (a producer, like the CLI)."""
        if self._broker is None:
            from worker.runtime.broker import make_redis_broker, reset_broker, setup_broker

            self._broker = setup_broker(broker=make_redis_broker(self.redis_url, self.namespace))
            self.stack.callback(reset_broker)
            self.stack.callback(self._broker.close)
        return self._broker

    def request(self, key_name: str = KEY_NAME, *, enqueue: bool = True, reason: str = "e2e") -> str:
        from worker.pipeline.outbox import enqueue_run
        from worker.pipeline.requests import request_rotation

        self.broker  # noqa: B018 - actors declared on the test namespace before enqueueing
        with session_scope(self.engine) as session:
            run, created = request_rotation(session, key_name=key_name, reason=reason, trigger="manual",
                                            requested_by="test:e2e", idempotency_key=uuid.uuid4().hex)
            run_id = run.id
        assert created, f"expected a new run for {key_name}"
        if enqueue:
            self.enqueue(run_id)
        return run_id

    def enqueue(self, run_id: str) -> None:
        from worker.pipeline.outbox import enqueue_run

        self.broker  # noqa: B018
        with session_scope(self.engine) as session:
            run = session.get(RotationRun, run_id)
            assert run is not None
            enqueue_run(run)

    def send_step(self, step: str, run_id: str) -> None:
        from worker.queues import send_step
        from worker.protocol import Step

        self.broker  # noqa: B018
        send_step(Step(step), run_id)

    # ------------------------------------------------------------------ reading
    def run(self, run_id: str) -> RotationRun:
        with session_scope(self.engine) as session:
            run = session.get(RotationRun, run_id)
            assert run is not None, f"no run {run_id}"
            session.expunge(run)
            return run

    def state(self, run_id: str) -> str:
        state = self.run(run_id).state
        return str(getattr(state, "value", state))

    def audit(self, run_id: str) -> list[AuditEvent]:
        with session_scope(self.engine) as session:
            rows = session.exec(select(AuditEvent).where(AuditEvent.run_id == run_id)
                                .order_by(col(AuditEvent.id))).all()
            for row in rows:
                session.expunge(row)
            return list(rows)

    def transitions(self, run_id: str) -> list[str]:
        return [e.to_state for e in self.audit(run_id) if e.event == "state_changed" and e.to_state]

    def versions(self, run_id: Optional[str] = None) -> list[KeyVersion]:
        with session_scope(self.engine) as session:
            query = select(KeyVersion).order_by(col(KeyVersion.id))
            if run_id is not None:
                query = query.where(KeyVersion.run_id == run_id)
            rows = session.exec(query).all()
            for row in rows:
                session.expunge(row)
            return list(rows)

    def sinks(self, run_id: str) -> dict[str, SinkDelivery]:
        with session_scope(self.engine) as session:
            rows = session.exec(select(SinkDelivery).where(SinkDelivery.run_id == run_id)).all()
            for row in rows:
                session.expunge(row)
            return {r.integration: r for r in rows}

    def trail(self, run_id: str) -> str:
        """The run's audit trail as text, for failure messages."""
        lines = []
        for e in self.audit(run_id):
            lines.append(f"  {e.at.isoformat() if e.at else '?'} {e.actor:>24} {e.event:<15} "
                         f"{e.from_state or ''} -> {e.to_state or ''} {json.dumps(e.detail, default=str)[:300]}")
        run = self.run(run_id)
        return (f"run {run_id}: state={self.state(run_id)} attempts={run.attempts} last_error={run.last_error!r}\n"
                + "\n".join(lines))

    def wait_state(self, run_id: str, states: Iterable[str] = ("completed",), *, timeout: float = 30.0,
                   tick: Optional[Callable[[], None]] = None) -> str:
        """Wait until the run is in one of ``states``; fail with its audit trail and worker logs if not.

        A run that reaches another terminal state fails at once (no point waiting)."""
        wanted = set(states)
        deadline = time.monotonic() + timeout
        state = self.state(run_id)
        while time.monotonic() < deadline:
            state = self.state(run_id)
            if state in wanted:
                return state
            if state in TERMINAL - wanted:
                break
            if tick is not None:
                tick()
            time.sleep(0.05)
        logs = self.worker_logs()[-4000:]
        pytest.fail(f"run did not reach {sorted(wanted)} within {timeout}s (now {state}).\n"
                    f"{self.trail(run_id)}\n--- worker logs (tail) ---\n{logs}", pytrace=False)

    def current_secret(self) -> str:
        stored = self.store.read_current(self.mount, KEY_PATH, KEY_FIELD)
        assert stored is not None
        return stored.secret.reveal()

    def copy_secret(self) -> Optional[str]:
        stored = self.store.read_current(self.mount, COPY_PATH, COPY_FIELD)
        return stored.secret.reveal() if stored is not None else None

    def keys_of_run(self, run_id: str) -> list[Any]:
        """Every key the provider minted under the run's name (invariant 7: at most one)."""
        with self.provider.state.lock:
            return [k for k in self.provider.state.keys.values() if k.name == f"keyrotor-{run_id}"]

    def issued_secrets(self) -> list[str]:
        """Every secret the provider stand-in ever minted (it remembers them all)."""
        with self.provider.state.lock:
            return [k.secret for k in self.provider.state.keys.values()]

    def redis_sampler(self) -> RedisSampler:
        sampler = RedisSampler(self)
        self.stack.callback(sampler.stop)
        return sampler

    def monitor(self) -> Monitor:
        monitor = Monitor(self).start()
        self.stack.callback(monitor.stop)
        return monitor

    # ------------------------------------------------------------------ the reconciler, run from here
    def reconcile(self, *, ahead_s: float = 3600.0, orphan_min_age_s: float = 0.0) -> tuple[Any, list[Any]]:
        """Run the reconciler's two jobs as the scheduler would, with its clock ``ahead_s`` in the
        future so step deadlines have passed (we do not wait minutes for them)."""
        from worker.service.reconcile import recover_stuck_runs, revoke_orphans
        from worker.providers.ratelimit import InMemoryRateLimiter
        from worker.providers.registry import build_provider
        from worker.secret_refs import make_resolver

        self.broker  # noqa: B018 - the reconciler enqueues through this process's broker
        now = datetime.now().astimezone() + timedelta(seconds=ahead_s)
        stuck = recover_stuck_runs(self.engine, now=now, notify=lambda *a, **k: None)
        resolve = make_resolver(self.store)
        orphans = revoke_orphans(self.engine, now=now, min_age_s=orphan_min_age_s,
                                 provider_factory=lambda record: build_provider(record, resolve=resolve,
                                                                                limiter=InMemoryRateLimiter()))
        return stuck, orphans

    def orphans_at_provider(self) -> list[str]:
        """Live provider keys other than the one Vault serves, unless a version the database keeps
        in flight (pending, previous-in-grace) holds them (invariant 4). A key the database calls
        ``current`` while Vault serves another one is an orphan too: nothing will ever revoke it."""
        current = self.current_secret()
        with session_scope(self.engine) as session:
            held = {v.provider_key_id for v in session.exec(select(KeyVersion)).all()
                    if str(getattr(v.stage, "value", v.stage)) in ("previous", "pending")}
        with self.provider.state.lock:
            live = [k for k in self.provider.state.keys.values() if not k.revoked]
        return [f"{k.name} ({k.id})" for k in live if k.secret != current and k.id not in held]

    # ------------------------------------------------------------------ what the service wrote
    def redis_dump(self) -> dict[str, bytes]:
        """Every key under the namespace with its value, read by type (strings, hashes, lists,
        sets, zsets, streams) plus its DUMP serialisation."""
        client = self.redis()
        out: dict[str, bytes] = {}
        try:
            for raw in client.scan_iter(match=f"{self.namespace}*", count=1000):
                name = raw.decode(errors="replace")
                kind = client.type(raw).decode()
                parts: list[bytes] = [raw]
                if kind == "string":
                    parts.append(client.get(raw) or b"")
                elif kind == "hash":
                    for k, v in client.hgetall(raw).items():
                        parts += [k, v]
                elif kind == "list":
                    parts += client.lrange(raw, 0, -1)
                elif kind == "set":
                    parts += list(client.smembers(raw))
                elif kind == "zset":
                    parts += [m for m, _ in client.zrange(raw, 0, -1, withscores=True)]
                elif kind == "stream":
                    for _id, fields in client.xrange(raw):
                        for k, v in fields.items():
                            parts += [k, v]
                dumped = client.dump(raw)
                if dumped:
                    parts.append(dumped)
                out[f"redis {kind} {name}"] = b"\n".join(parts)
        finally:
            client.close()
        return out

    def db_dump(self) -> dict[str, bytes]:
        """Every row of every table, as PostgreSQL's text form of the row."""
        out: dict[str, bytes] = {}
        with self.engine.connect() as conn:
            tables = [r[0] for r in conn.execute(sa.text(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"))]
            for table in tables:
                rows = conn.execute(sa.text(f'SELECT t::text FROM "{table}" t')).scalars().all()
                out[f"table {table}"] = "\n".join(rows).encode()
        return out

    def leaks(self, secrets_: Iterable[str], extra: Optional[dict[str, bytes]] = None) -> list[str]:
        """Where any of ``secrets_`` appears in what the service wrote (empty: nowhere)."""
        blobs: dict[str, bytes] = {}
        for worker in self.workers:
            blobs[f"{worker.name} stdout"] = worker.stdout_path.read_bytes()
            blobs[f"{worker.name} stderr"] = worker.stderr_path.read_bytes()
        blobs.update(self.redis_dump())
        blobs.update(self.db_dump())
        blobs.update(extra or {})
        found = []
        for value in secrets_:
            needle = value.encode()
            for where, blob in blobs.items():
                if needle in blob:
                    found.append(f"{fingerprint(value)} in {where}")
        return found


def render_inventory(world_bits: dict[str, Any], *, grace_s: int, activation_timeout_s: int,
                     rate_limit: int = 200, with_consumer: bool = True, with_copy: bool = True,
                     check_attempts_note: str = "") -> dict[str, Any]:
    from keyrotor_sandbox.provider import standin_provider_spec

    provider = standin_provider_spec(
        world_bits["provider_url"], admin_token_ref={"env": PROVIDER_TOKEN_ENV},
        rate_limit={"requests": rate_limit, "per": "1s"},
        activation={"poll_interval": "1s", "timeout": f"{activation_timeout_s}s"})
    # An issue call without an answer is settled 2 x this after it started (list, revoke strays).
    provider["calls"]["issue"]["timeout"] = "2s"
    integrations: dict[str, Any] = {}
    if with_consumer:
        integrations["app-consumer"] = {
            "kind": "webhook", "url": world_bits["consumer_url"] + "/hooks/keyrotor",
            "signing_secret": {"env": WEBHOOK_SECRET_ENV}, "include_secret": False,
            "health_url": world_bits["consumer_url"] + "/health", "timeout": "5s"}
    if with_copy:
        integrations["app-copy"] = {"kind": "vault_copy", "mount": world_bits["mount"], "path": "copies/{key_slug}",
                                    "field": COPY_FIELD}
    return {
        "version": 1,
        "policies": {"e2e": {"expiry_lead_time": "7d", "max_age": "90d", "grace_period": grace_s}},
        "providers": {PROVIDER: provider},
        "integrations": integrations,
        "keys": {KEY_NAME: {"provider": PROVIDER, "credential_type": "api_key", "owner": "e2e@example.com",
                            "vault": {"mount": world_bits["mount"], "path": KEY_PATH, "field": KEY_FIELD},
                            "policy": "e2e", "integrations": sorted(integrations)}},
    }


WorldFactory = Callable[..., World]


@pytest.fixture
def make_world(pg_url: str, redis_url: str, redis_namespace: str, vault: Any, vault_mount: str,
               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WorldFactory]:
    """``make_world(grace_s=1, activation_delay=0.0, probe_ms=40, ...)`` → a ready ``World``."""
    from worker.inventory.apply import apply_inventory
    from worker.inventory.loader import load_inventory
    from keyrotor_sandbox.consumer import start_consumer_in_thread
    from worker.settings import get_settings, load_settings
    from worker.vault.store import VaultStore

    stack = ExitStack()
    worlds: list[World] = []

    def build(*, grace_s: int = 1, activation_delay: float = 0.0, activation_timeout_s: int = 20,
              probe_ms: Optional[int] = 40, with_consumer: bool = True, with_copy: bool = True,
              rate_limit: int = 200) -> World:
        provider, run_key_faults = start_provider(activation_delay)
        stack.callback(provider.stop)
        webhook_secret = secrets.token_urlsafe(24)
        monkeypatch.setenv(PROVIDER_TOKEN_ENV, provider.admin_token)
        monkeypatch.setenv(WEBHOOK_SECRET_ENV, webhook_secret)
        get_settings.cache_clear()
        store = VaultStore.from_settings(load_settings(VAULT_ADDR=vault.addr, VAULT_TOKEN=vault.token,
                                                       vault_mount=vault_mount, vault_timeout_s=5.0))
        # The key's first credential: live at the provider, stored in Vault (as if adopted).
        seed = provider.seed_key("seed-e2e-app")
        store.promote(vault_mount, KEY_PATH, KEY_FIELD, Secret(seed.secret), provider_key_id=seed.id,
                      expected_version=None)
        consumer = None
        if with_consumer:
            consumer = start_consumer_in_thread(
                vault_addr=vault.addr, vault_token=vault.token, mount=vault_mount, path=KEY_PATH, field=KEY_FIELD,
                provider_url=provider.url, signing_secret=webhook_secret, probe_interval_ms=probe_ms,
                check_path=CONSUMER_CHECK_PATH)
            stack.callback(consumer.stop)
        engine = make_engine(pg_url)
        stack.callback(engine.dispose)
        bits = {"provider_url": provider.url, "consumer_url": consumer.url if consumer else "", "mount": vault_mount}
        document = render_inventory(bits, grace_s=grace_s, activation_timeout_s=activation_timeout_s,
                                    rate_limit=rate_limit, with_consumer=with_consumer, with_copy=with_copy)
        path = tmp_path / f"inventory-{len(worlds)}.yaml"
        path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
        with session_scope(engine) as session:
            apply_inventory(session, load_inventory(path), actor="test:e2e")
        world = World(tmp_path=tmp_path, db_url=pg_url, redis_url=redis_url, namespace=redis_namespace,
                      vault_addr=vault.addr, vault_token=vault.token, mount=vault_mount, provider=provider,
                      run_key_faults=run_key_faults,
                      consumer=consumer, webhook_secret=webhook_secret, engine=engine, store=store,
                      seed_secret=seed.secret, seed_key_id=seed.id, stack=ExitStack())
        worlds.append(world)
        return world

    yield build
    for world in worlds:  # workers first: nothing may talk to stand-ins being shut down
        for worker in world.workers:
            worker.stop()
        world.stack.close()
    stack.close()
    get_settings.cache_clear()
    from worker.pipeline.context import configure

    configure(None)
