"""The chaos soak: keyrotor's own processes (``keyrotor worker`` ×N, ``keyrotor scheduler``) on
real PostgreSQL, a private Redis and the real OpenBao, with faults injected and processes killed,
watched from the outside. docs/chaos.md explains the phases and the figures.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import httpx
import sqlalchemy as sa
import yaml

from tests.chaos.soak.checks import (
    audit_chain_violations,
    find_leaks,
    held_in_flight,
    open_run_keys,
    quantile,
    served_versions,
    two_open_runs,
)
from tests.chaos.soak.proxy import FaultPlan, FaultProxy
from tests.chaos.soak.services import ConnectionKiller, PrivateRedis, free_port
from tests.e2e.conftest import PROVIDER_TOKEN_ENV, REPO, World, WorkerProcess, start_provider
from worker.secret import Secret, fingerprint

APP_PREFIX = "keyrotor-chaos"
NAMESPACE = "chaos"
PROVIDER = "standin"
FIELD = "api_key"
SETTLED = {"completed", "failed", "rolled_back", "cancelled", "needs_attention"}


@dataclass(frozen=True)
class ChaosParams:
    keys: int = 12
    workers: int = 3
    threads: int = 2
    baseline_rounds: int = 1          # rotations per key without kills (the baseline)
    rounds: int = 2                   # rotations per key under kills
    worker_kill_s: float = 6.0        # a random worker is SIGKILLed (and restarted) this often
    scheduler_kill_s: float = 25.0
    db_kill_s: float = 6.0
    fault_rate: float = 0.03          # share of proxied requests that meet a fault
    redis_restarts: bool = True       # one keeping its data, one losing it
    grace_s: int = 2
    min_uptime_s: float = 10.0        # a worker is only killed once it has run this long
    log_level: str = "INFO"
    phase_timeout_s: float = 600.0
    drain_timeout_s: float = 240.0
    seed: int = 14

    @classmethod
    def from_env(cls, base: "ChaosParams") -> "ChaosParams":
        """``KEYROTOR_CHAOS_<FIELD>`` overrides (docs/chaos.md lists them)."""
        values: dict[str, Any] = {}
        for name, current in base.__dict__.items():
            raw = os.environ.get(f"KEYROTOR_CHAOS_{name.upper()}")
            if raw is not None:
                values[name] = raw.lower() in {"1", "true", "yes"} if isinstance(current, bool) else type(current)(raw)
        return ChaosParams(**{**base.__dict__, **values})


SHORT = ChaosParams(keys=8, workers=2, baseline_rounds=1, rounds=1, worker_kill_s=8.0, scheduler_kill_s=30.0,
                    db_kill_s=8.0, phase_timeout_s=400.0)
FULL = ChaosParams(keys=60, workers=4, baseline_rounds=1, rounds=5, worker_kill_s=3.0, scheduler_kill_s=20.0,
                   db_kill_s=4.0, phase_timeout_s=2400.0, drain_timeout_s=300.0, min_uptime_s=8.0, log_level="DEBUG")


@dataclass
class ChaosWorld(World):
    """The e2e ``World`` with the chaos settings and a ``/metrics`` port per process."""

    extra_env: dict[str, str] = field(default_factory=dict)
    metrics_ports: dict[str, int] = field(default_factory=dict)
    next_port: int = 0

    def worker_env(self, log_level: str = "DEBUG") -> dict[str, str]:
        env = super().worker_env(log_level)
        env.update(self.extra_env)
        env["KEYROTOR_METRICS_PORT"] = str(self.next_port)
        return env

    def start_worker(self, *, threads: int = 2, log_level: str = "DEBUG", wait: bool = True) -> WorkerProcess:
        self.next_port = free_port()
        handle = super().start_worker(threads=threads, log_level=log_level, wait=wait)
        self.metrics_ports[handle.name] = self.next_port
        return handle


@dataclass
class Figures:
    rotations: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    kills: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    probes: int = 0
    failed_probes: list[str] = field(default_factory=list)
    unaccounted: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    times: dict[str, list[float]] = field(default_factory=dict)
    leaks: list[str] = field(default_factory=list)
    planted_found: list[str] = field(default_factory=list)
    scanned: dict[str, int] = field(default_factory=dict)
    duration_s: float = 0.0

    def render(self, params: ChaosParams) -> str:
        def stats(name: str) -> tuple[float, float]:
            values = self.times.get(name, [])
            return quantile(values, 0.5), quantile(values, 0.95)

        base, chaos = stats("baseline"), stats("chaos")
        lines = [
            f"chaos run: {params.keys} keys, {params.workers} worker processes x {params.threads} threads, "
            f"fault rate {params.fault_rate:.0%}, {self.duration_s:.0f} s",
            f"rotations completed: {self.rotations}  outcomes: {dict(sorted(self.outcomes.items()))}",
            f"kills: {dict(sorted(self.kills.items()))}",
            f"faults injected: {dict(sorted(self.faults.items()))}",
            f"probes: {self.probes}  failed probes: {len(self.failed_probes)}",
            f"unaccounted provider keys: {len(self.unaccounted)}",
            f"invariant violations: {len(self.violations)}",
            f"rotation time without kills: median {base[0]:.1f} s, p95 {base[1]:.1f} s (n={len(self.times.get('baseline', []))})",
            f"rotation time under kills:   median {chaos[0]:.1f} s, p95 {chaos[1]:.1f} s (n={len(self.times.get('chaos', []))})",
            f"ratio under kills / without: median {chaos[0] / base[0]:.2f}x, p95 {chaos[1] / base[1]:.2f}x",
            f"leak scan: planted secret found in {self.planted_found}; "
            f"{len(self.leaks)} leaks in {sum(self.scanned.values()) / 1e6:.1f} MB "
            f"({', '.join(f'{k} {v / 1e6:.1f} MB' for k, v in sorted(self.scanned.items()))})",
        ]
        for title, items in (("failed probe", self.failed_probes), ("unaccounted", self.unaccounted),
                             ("violation", self.violations), ("leak", self.leaks)):
            lines += [f"  {title}: {item}" for item in items[:20]]
        return "\n".join(lines)


class ChaosRun:
    def __init__(self, *, params: ChaosParams, pg_url: str, pg_admin_url: str, vault_addr: str, vault_token: str,
                 mount: str, tmp_path: Path) -> None:
        self.params, self.tmp_path = params, tmp_path
        self.rng = random.Random(params.seed)
        self.stack = ExitStack()
        self.fig = Figures()
        self.pg_url, self.pg_admin_url = pg_url, pg_admin_url
        self.vault_addr, self.vault_token, self.mount = vault_addr, vault_token, mount
        self.stop_chaos = threading.Event()
        self.stop_watch = threading.Event()
        self.completed_in_chaos = 0
        self.target_in_chaos = params.keys * params.rounds
        self.redis_samples: dict[str, set[bytes]] = {}
        self.metrics_scrapes: dict[str, bytes] = {}
        self.schedulers: list[WorkerProcess] = []
        self.active: list[WorkerProcess] = []
        self.started: dict[str, float] = {}
        self.lock = threading.Lock()
        self.key_names = [f"chaos/k{i:02d}" for i in range(params.keys)]

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        from worker.db.session import make_engine, session_scope
        from worker.inventory.apply import apply_inventory
        from worker.inventory.loader import load_inventory
        from keyrotor_sandbox.provider import standin_provider_spec
        from worker.settings import load_settings
        from worker.vault.store import VaultStore

        p = self.params
        self.redis = PrivateRedis(self.tmp_path / "redis")
        self.redis.start()
        self.stack.callback(self.redis.stop)
        provider, run_key_faults = start_provider(activation_delay=0.3)
        self.stack.callback(provider.stop)
        self.provider = provider
        sys_paths = ("/v1/sys/", "/v1/auth/")
        self.vault_proxy = FaultProxy("vault", self.vault_addr, FaultPlan(
            rate=p.fault_rate, rng=random.Random(p.seed + 1), exempt=lambda m, path: path.startswith(sys_paths)))
        self.provider_proxy = FaultProxy("provider", provider.url, FaultPlan(rate=p.fault_rate, rng=random.Random(p.seed + 2)))
        self.stack.callback(self.vault_proxy.stop)
        self.stack.callback(self.provider_proxy.stop)
        self.store = VaultStore.from_settings(load_settings(VAULT_ADDR=self.vault_addr, VAULT_TOKEN=self.vault_token,
                                                           vault_mount=self.mount, vault_timeout_s=10.0))
        spec = standin_provider_spec(self.provider_proxy.url, admin_token_ref={"env": PROVIDER_TOKEN_ENV},
                                     rate_limit={"requests": 1000, "per": "1s"},
                                     activation={"poll_interval": "1s", "timeout": "20s"})
        spec["calls"]["issue"]["timeout"] = "2s"
        self.inventory = {
            "version": 1,
            "policies": {"chaos": {"expiry_lead_time": "7d", "max_age": "90d", "grace_period": p.grace_s}},
            "providers": {PROVIDER: spec},
            "integrations": {},
            "keys": {name: {"provider": PROVIDER, "credential_type": "api_key", "owner": "chaos@example.com",
                            "vault": {"mount": self.mount, "path": self.path(name), "field": FIELD},
                            "policy": "chaos", "integrations": []} for name in self.key_names},
        }
        for name in self.key_names:
            seed = provider.seed_key("seed-" + name.replace("/", "-"))
            self.store.promote(self.mount, self.path(name), FIELD, Secret(seed.secret), provider_key_id=seed.id,
                               expected_version=None)
        self.engine = make_engine(self.pg_url)
        self.stack.callback(self.engine.dispose)
        inventory_path = self.tmp_path / "chaos-inventory.yaml"
        inventory_path.write_text(yaml.safe_dump(self.inventory, sort_keys=False), encoding="utf-8")
        with session_scope(self.engine) as session:
            apply_inventory(session, load_inventory(inventory_path), actor="test:chaos")
        with self.engine.connect() as conn:
            self.key_ids = {r.name: r.id for r in conn.execute(sa.text("SELECT id, name FROM managed_key"))}
        self.world = ChaosWorld(
            tmp_path=self.tmp_path, db_url=self.pg_url, redis_url=self.redis.url, namespace=NAMESPACE,
            vault_addr=self.vault_proxy.url, vault_token=self.vault_token, mount=self.mount, provider=provider,
            run_key_faults=run_key_faults, consumer=None, webhook_secret="unused", engine=self.engine,
            store=self.store, seed_secret="", seed_key_id="", stack=ExitStack(),
            extra_env={
                "KEYROTOR_VAULT_TIMEOUT_S": "3", "KEYROTOR_HTTP_TIMEOUT_S": "3",
                "KEYROTOR_STEP_MAX_RETRIES": "12", "KEYROTOR_STEP_MIN_BACKOFF_S": "0.5",
                "KEYROTOR_STEP_MAX_BACKOFF_S": "5", "KEYROTOR_STEP_TIME_LIMIT_S": "20",
                "KEYROTOR_BROKER_HEARTBEAT_TIMEOUT_S": "5", "KEYROTOR_RECONCILE_STEP_TIMEOUT_S": "40",
                "KEYROTOR_RECONCILE_MAX_ATTEMPTS": "20", "KEYROTOR_ORPHAN_MIN_AGE_S": "20",
                "KEYROTOR_DB_APPLICATION_NAME": f"{APP_PREFIX}-worker", "KEYROTOR_DB_POOL_SIZE": "3",
                "KEYROTOR_DB_POOL_TIMEOUT_S": "10",
            })
        self.stack.callback(self._stop_processes)
        self.producer_settings()
        self.killer = ConnectionKiller(self.pg_admin_url, self.pg_url.rsplit("/", 1)[1], APP_PREFIX)
        self.stack.callback(self.killer.close)
        for _ in range(p.workers):
            self.active.append(self.world.start_worker(threads=p.threads, log_level=p.log_level, wait=True))
        self.start_scheduler()

    def producer_settings(self) -> None:
        """This process requests the rotations (as `keyrotor rotate` would): with the processes'
        settings, so a new run's first deadline is theirs (2 x the step time limit)."""
        from worker.settings import get_settings

        saved = {k: os.environ.get(k) for k in self.world.extra_env}
        os.environ.update(self.world.extra_env)
        get_settings.cache_clear()

        def restore() -> None:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            get_settings.cache_clear()

        self.stack.callback(restore)

    def path(self, name: str) -> str:
        return "apps/" + name

    def start_scheduler(self) -> WorkerProcess:
        import sys

        index = len(self.schedulers)
        out, err = self.tmp_path / f"scheduler-{index}.out", self.tmp_path / f"scheduler-{index}.err"
        port = free_port()
        env = self.world.worker_env(self.params.log_level)
        env.update({"KEYROTOR_DB_APPLICATION_NAME": f"{APP_PREFIX}-scheduler", "KEYROTOR_METRICS_PORT": str(port)})
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-m", "worker.cli.main", "scheduler", "--reconcile-interval", "3",
                 "--retirement-interval", "1", "--orphan-interval", "8", "--detection-interval", "30",
                 "--lock-ttl", "4"],
                cwd=REPO, env=env, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, start_new_session=True)
        handle = WorkerProcess(f"scheduler-{index}", proc, out, err)
        self.world.metrics_ports[handle.name] = port
        self.schedulers.append(handle)
        return handle

    def _stop_processes(self) -> None:
        for proc in self.world.workers + self.schedulers:
            proc.stop()

    def close(self) -> None:
        self.stop_chaos.set()
        self.stop_watch.set()
        self.world.stack.close()
        self.stack.close()

    # ------------------------------------------------------------------ the observers
    def prober(self) -> None:
        """For every key, continuously: does the key Vault serves (read directly) work at the
        provider (the stand-in's own state, not through the proxy)?"""
        state = self.provider.state
        while not self.stop_watch.is_set():
            for name in self.key_names:
                if self.stop_watch.is_set():
                    return
                try:
                    stored = self.store.read_current(self.mount, self.path(name), FIELD)
                except Exception as exc:  # Vault itself is never faulted for the prober
                    self.fig.failed_probes.append(f"{name}: Vault read failed: {type(exc).__name__}")
                    continue
                self.fig.probes += 1
                served = stored.secret.reveal() if stored else ""
                key = state.find_secret(served)
                if key is None or not state.key_is_live(key):
                    why = "unknown to the provider" if key is None else ("revoked" if key.revoked else "not live yet")
                    self.fig.failed_probes.append(f"{time.strftime('%H:%M:%S')} {name}: Vault serves "
                                                  f"{fingerprint(served)}, {why}")
            time.sleep(0.05)

    def watcher(self) -> None:
        """Samples Redis (queue messages are there only until acknowledged), /metrics of every
        live process, and the one-open-run-per-key invariant."""
        while not self.stop_watch.wait(1.0):
            try:
                for name, blob in self.world.redis_dump().items():
                    self.redis_samples.setdefault(name, set()).add(blob)
            except Exception:  # noqa: BLE001 - Redis is being restarted
                pass
            for proc in list(self.active) + self.schedulers[-1:]:
                port = self.world.metrics_ports.get(proc.name)
                if port and proc.alive():
                    try:
                        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).content
                        self.metrics_scrapes[proc.name] = self.metrics_scrapes.get(proc.name, b"")[-2_000_000:] + text
                    except httpx.HTTPError:
                        pass
            try:
                with self.engine.connect() as conn:
                    self.fig.violations += two_open_runs(conn)
            except sa.exc.SQLAlchemyError:
                pass

    # ------------------------------------------------------------------ chaos
    def chaos(self) -> None:
        p, now = self.params, time.monotonic()
        next_worker, next_sched, next_db = now + p.worker_kill_s, now + p.scheduler_kill_s, now + p.db_kill_s
        redis_plan = [(0.3, True), (0.6, False)] if p.redis_restarts else []
        while not self.stop_chaos.wait(0.2):
            now = time.monotonic()
            self.supervise()
            grown = [w for w in self.active if now - self.ready_since(w, now) >= p.min_uptime_s]
            if now >= next_worker and grown:
                victim = self.rng.choice(grown)
                victim.kill(signal.SIGKILL)
                self.fig.kills["worker_sigkill"] += 1
                self.replace(victim)
                next_worker = now + p.worker_kill_s * self.rng.uniform(0.5, 1.5)
            if now >= next_sched:
                self.schedulers[-1].kill(signal.SIGKILL)
                self.fig.kills["scheduler_sigkill"] += 1
                time.sleep(1.0)
                self.start_scheduler()
                next_sched = now + p.scheduler_kill_s * self.rng.uniform(0.5, 1.5)
            if now >= next_db:
                try:
                    self.fig.kills["db_backends_terminated"] += self.killer.kill_all()
                    self.fig.kills["db_kill_passes"] += 1
                except sa.exc.SQLAlchemyError:
                    pass
                next_db = now + p.db_kill_s * self.rng.uniform(0.5, 1.5)
            if redis_plan and self.completed_in_chaos >= redis_plan[0][0] * self.target_in_chaos:
                _, keep = redis_plan.pop(0)
                self.redis.restart(keep_data=keep)
                self.fig.kills["redis_restart_kept_data" if keep else "redis_restart_lost_data"] += 1

    def ready_since(self, proc: WorkerProcess, now: float) -> float:
        """When the worker logged ``worker.started`` (it consumes), as this loop first saw it;
        ``now`` until then: a worker still importing is never the victim (start-up takes many
        seconds on a loaded machine, and killing it then would test nothing)."""
        if proc.name not in self.started:
            try:
                if b"worker.started" in proc.stdout_path.read_bytes():
                    self.started[proc.name] = now
            except OSError:
                pass
        return self.started.get(proc.name, now)

    def replace(self, proc: WorkerProcess) -> None:
        with self.lock:
            if proc in self.active:
                self.active.remove(proc)
            self.active.append(self.world.start_worker(threads=self.params.threads, log_level=self.params.log_level,
                                                       wait=False))

    def supervise(self) -> None:
        """Processes that exited on their own (e.g. Redis went away) are restarted and counted."""
        for proc in list(self.active):
            if not proc.alive():
                self.fig.kills["worker_exited_itself"] += 1
                # Its exit status says how it ended: < 0 a signal (-9 SIGKILL, -11 a crash), > 0 its own exit.
                self.fig.kills[f"worker_exited_itself_status_{proc.proc.returncode}"] += 1
                self.replace(proc)
        if not self.schedulers[-1].alive():
            self.fig.kills["scheduler_exited_itself"] += 1
            self.start_scheduler()

    # ------------------------------------------------------------------ driving rotations
    def drive(self, rounds: int, *, chaos: bool) -> list[str]:
        """Request ``rounds`` rotations of every key (one at a time per key) and wait until every
        run settled."""
        from worker.db.session import session_scope
        from worker.pipeline.outbox import enqueue_run
        from worker.pipeline.requests import request_rotation

        self.world.broker  # noqa: B018 - this process produces on the private Redis
        done: Counter[str] = Counter()
        runs: list[str] = []
        states: dict[str, str] = {}
        deadline = time.monotonic() + self.params.phase_timeout_s
        next_note = time.monotonic() + 15
        while time.monotonic() < deadline:
            if time.monotonic() >= next_note:
                next_note += 15
                print(f"chaos: {'kills' if chaos else 'baseline'} phase, {len(runs)} runs requested, "
                      f"{dict(Counter(states.get(r) for r in runs))}, kills {dict(self.fig.kills)}", flush=True)
            try:
                with self.engine.connect() as conn:
                    busy = set(open_run_keys(conn))
                    states = dict(conn.execute(sa.text("SELECT id, state FROM rotation_run")).all())
            except sa.exc.SQLAlchemyError:
                time.sleep(0.5)
                continue
            settled = [r for r in runs if states.get(r) in SETTLED]
            if chaos:
                self.completed_in_chaos = len(settled)
            if len(settled) == len(runs) and all(done[n] >= rounds for n in self.key_names):
                return runs
            for name in self.key_names:
                if done[name] >= rounds or self.key_ids[name] in busy:
                    continue
                with session_scope(self.engine) as session:
                    run, created = request_rotation(session, key_name=name, reason="chaos", trigger="manual",
                                                    requested_by="test:chaos", idempotency_key=uuid.uuid4().hex)
                    run_id = run.id
                if not created:
                    continue
                runs.append(run_id)
                done[name] += 1
                try:
                    with session_scope(self.engine) as session:
                        enqueue_run(session.get(type(run), run_id))
                except Exception:  # noqa: BLE001 - Redis down: the reconciler picks the run up
                    pass
            time.sleep(0.3)
        raise AssertionError(f"phase did not settle within {self.params.phase_timeout_s:.0f}s: "
                             f"{sum(1 for r in runs if states.get(r) not in SETTLED)} runs open")

    # ------------------------------------------------------------------ the whole run
    def run(self) -> Figures:
        started = time.monotonic()
        watchers = [threading.Thread(target=f, daemon=True, name=f.__name__) for f in (self.prober, self.watcher)]
        for t in watchers:
            t.start()
        baseline = self.drive(self.params.baseline_rounds, chaos=False)
        chaos = threading.Thread(target=self.chaos, daemon=True, name="chaos")
        chaos.start()
        try:
            under_kills = self.drive(self.params.rounds, chaos=True)
        finally:
            self.stop_chaos.set()
            chaos.join(timeout=30)
        self.drain()
        self.stop_watch.set()
        for t in watchers:
            t.join(timeout=30)
        self.fig.faults = Counter({f"vault_{k}": v for k, v in self.vault_proxy.injected.items()})
        self.fig.faults.update({f"provider_{k}": v for k, v in self.provider_proxy.injected.items()})
        self.check(baseline, under_kills)
        self.leak_scan()
        self.fig.duration_s = time.monotonic() - started
        return self.fig

    def drain(self) -> None:
        """Faults off, every process up; wait until no run is open and the orphan scan has
        revoked every key nothing holds (bounded)."""
        self.vault_proxy.plan.rate = self.provider_proxy.plan.rate = 0.0
        self.supervise()
        deadline = time.monotonic() + self.params.drain_timeout_s
        while time.monotonic() < deadline:
            self.supervise()
            with self.engine.connect() as conn:
                if not open_run_keys(conn) and not self.unaccounted():
                    return
            time.sleep(1.0)

    def unaccounted(self) -> list[str]:
        """Live provider keys that are neither served by Vault for some key, nor held by an open
        run (previous in grace, pending): nothing would ever revoke them."""
        served: set[str] = set()
        for name in self.key_names:
            stored = self.store.read_current(self.mount, self.path(name), FIELD)
            if stored is not None and stored.provider_key_id:
                served.add(stored.provider_key_id)
        with self.engine.connect() as conn:
            held = held_in_flight(conn)
        with self.provider.state.lock:
            live = [k for k in self.provider.state.keys.values() if not k.revoked]
        return [f"{k.name} ({k.id})" for k in live if k.id not in served and k.id not in held]

    def check(self, baseline: list[str], under_kills: list[str]) -> None:
        with self.engine.connect() as conn:
            rows = {r.id: r for r in conn.execute(sa.text("SELECT id, state, created_at, finished_at FROM rotation_run"))}
            self.fig.violations += audit_chain_violations(conn)
            self.fig.violations += [f"run {r} still open after the drain" for r in rows
                                    if rows[r].state not in SETTLED]
            current = served_versions(conn)
        self.fig.outcomes = Counter(r.state for r in rows.values())
        self.fig.rotations = self.fig.outcomes["completed"]
        for phase, ids in (("baseline", baseline), ("chaos", under_kills)):
            self.fig.times[phase] = [(rows[i].finished_at - rows[i].created_at).total_seconds() for i in ids
                                     if rows[i].state == "completed" and rows[i].finished_at]
        for name in self.key_names:  # the database's current version is the one Vault serves
            stored = self.store.read_current(self.mount, self.path(name), FIELD)
            db_current = current.get(self.key_ids[name])
            if stored is None or stored.provider_key_id != db_current:
                self.fig.violations.append(f"{name}: Vault serves {stored and stored.provider_key_id}, "
                                           f"the database's current version is {db_current}")
        self.fig.unaccounted = self.unaccounted()

    # ------------------------------------------------------------------ leak scan
    def secrets(self) -> dict[str, str]:
        with self.provider.state.lock:
            issued = {f"issued secret {k.name}": k.secret for k in self.provider.state.keys.values()}
        return {"Vault token": self.vault_token, "provider admin token": self.provider.admin_token, **issued}

    def outputs(self) -> dict[str, bytes]:
        """Everything keyrotor's processes wrote or exposed during the run."""
        blobs: dict[str, bytes] = {}
        for proc in self.world.workers + self.schedulers:
            blobs[f"{proc.name} stdout"] = proc.stdout_path.read_bytes()
            blobs[f"{proc.name} stderr"] = proc.stderr_path.read_bytes()
        blobs.update({f"{name} (sampled)": b"\n".join(sorted(v)) for name, v in self.redis_samples.items()})
        blobs.update(self.world.redis_dump())
        blobs.update(self.world.db_dump())
        blobs.update({f"{name} /metrics": text for name, text in self.metrics_scrapes.items()})
        blobs["helm manifest"] = self.helm_manifest()
        return blobs

    def helm_manifest(self) -> bytes:
        """The chart rendered with this run's inventory and settings (as `helm template` would)."""
        import helm_python

        values = {"config": {"inventory": self.inventory}, "queueNamespace": NAMESPACE,
                  "redis": {"url": self.redis.url},
                  "vault": {"address": self.vault_proxy.url, "mount": self.mount,
                            "auth": {"method": "token", "token": {"existingSecret": "chaos-vault-token"}}},
                  "extraEnv": [{"name": PROVIDER_TOKEN_ENV,
                                "valueFrom": {"secretKeyRef": {"name": "chaos-provider", "key": "token"}}}]}
        with helm_python.Chart.load(REPO / "helm" / "keyrotor") as chart:
            out = chart.render(values, name="chaos", namespace="chaos", is_install=True)
        return "\n".join(out.values()).encode()

    def leak_scan(self) -> None:
        """First a planted secret must be found (the scan can fail), then the real scan."""
        import redis

        secrets_ = self.secrets()
        planted = next(v for k, v in secrets_.items() if k.startswith("issued secret keyrotor-"))
        client = redis.Redis.from_url(self.redis.url)
        client.set(f"{NAMESPACE}:planted", f"x{planted}x")
        try:
            blobs = self.outputs()
            blobs["worker-0 stdout (planted copy)"] = blobs["worker-0 stdout"] + planted.encode()
            self.fig.planted_found = [leak.split(" in ", 1)[1] for leak in find_leaks({"planted": planted}, blobs)]
        finally:
            client.delete(f"{NAMESPACE}:planted")
            client.close()
        blobs = self.outputs()
        self.fig.scanned = Counter()
        for where, blob in blobs.items():
            kind = ("metrics" if where.endswith("/metrics") else "logs" if where.startswith(("worker", "scheduler"))
                    else where.split(" ")[0])
            self.fig.scanned[kind] += len(blob)
        self.fig.leaks = find_leaks(secrets_, blobs)
