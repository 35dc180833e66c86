"""The embedded world `keyrotor demo` runs in: a temp dir with a SQLite file, a real OpenBao dev
server on a free port (unless VAULT_ADDR names a Vault), provider and consumer stand-ins on free
ports, and an in-process Dramatiq worker (StubBroker, or Redis when KEYROTOR_REDIS_URL answers).

The demo configures keyrotor exactly as an operator would — through KEYROTOR_* environment
variables read by ``get_settings()`` — so the pipeline runs its production code paths.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TextIO

from sqlalchemy.engine import Engine

from worker.cli.common import redis_reachable
from worker.db.migrate import upgrade
from worker.db.session import engine_for
from worker.log import configure_logging
from worker.settings import get_settings
from keyrotor_sandbox.consumer import start_consumer_in_thread
from keyrotor_sandbox.openbao import start_dev_server
from keyrotor_sandbox.provider import start_provider_in_thread
from worker.db.models import ProviderRecord
from worker.errors import ConfigError
from worker.pipeline.context import StepPolicy, configure, context_from_settings
from worker.providers.ratelimit import InMemoryRateLimiter
from worker.providers.registry import provider_builder
from worker.redis_conn import redis_client
from worker.runtime.broker import make_redis_broker, make_stub_broker, reset_broker, setup_broker
from worker.runtime.workers import start_worker
from worker.secret_refs import make_resolver
from worker.vault.store import VaultStore

#: Environment the demo sets for its own process (restored on exit).
DEMO_ENV = (
    "KEYROTOR_DATABASE_URL", "VAULT_ADDR", "VAULT_TOKEN", "KEYROTOR_VAULT_MOUNT", "KEYROTOR_QUEUE_NAMESPACE",
    "KEYROTOR_METRICS_PORT", "KEYROTOR_DEMO_PROVIDER_ADMIN_TOKEN", "KEYROTOR_DEMO_WEBHOOK_SECRET",
)


#: Demo timings: the production retry budget spans minutes (backoff up to 5 min); the demo keeps
#: the same bounded, jittered policy on a seconds scale so a failing verification is rolled back
#: within the run of `make demo`.
def _demo_policy() -> Any:
    return StepPolicy(max_retries=3, min_backoff_ms=300, max_backoff_ms=1_500, time_limit_ms=30_000,
                      activation_poll_s=0.5, activation_timeout_s=20.0, revocation_timeout_s=10.0)


def _in_memory_limited_providers(vault: Any) -> Any:
    """Providers from the applied inventory, rate-limited by one in-process limiter (the demo's
    single worker process is the only caller, so Redis is not needed to share the limit)."""
    build = provider_builder(make_resolver(vault), InMemoryRateLimiter())

    def factory(session: Any, key: Any) -> Any:
        record = session.get(ProviderRecord, key.provider)
        if record is None:
            raise LookupError(f"provider {key.provider!r} of key {key.name!r} is not in the applied inventory")
        return build(record)

    return factory


@dataclass
class DemoEnvironment:
    workdir: Path
    keep_workdir: bool
    database_url: str
    db_path: Path
    log_path: Path
    vault_url: str
    vault_external: bool          # True: the Vault VAULT_ADDR names; False: our own OpenBao dev server
    vault_mount: str
    provider: Any                 # keyrotor_sandbox.provider.ProviderHandle
    webhook_secret: str
    broker_kind: str              # "stub" | "redis"
    queue_namespace: str
    engine: Engine
    stack: ExitStack
    vault_store: Any = None       # worker.vault.store.VaultStore
    consumers: dict[str, Any] = field(default_factory=dict)   # integration name → consumer handle
    worker: Any = None            # the in-process Dramatiq worker
    _saved_env: dict[str, Optional[str]] = field(default_factory=dict)

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def start(cls, *, keep: bool, log_stream: Optional[TextIO] = None, activation_delay_s: float = 1.0) -> "DemoEnvironment":
        stack = ExitStack()
        try:
            return cls._start(stack, keep=keep, log_stream=log_stream, activation_delay_s=activation_delay_s)
        except BaseException:
            stack.close()
            raise

    @classmethod
    def _start(cls, stack: ExitStack, *, keep: bool, log_stream: Optional[TextIO], activation_delay_s: float) -> "DemoEnvironment":
        saved = {name: os.environ.get(name) for name in DEMO_ENV}
        stack.callback(_restore_env, saved)
        stack.callback(get_settings.cache_clear)

        # Vault first (without one there is nothing to show): the one VAULT_ADDR names, else an
        # OpenBao dev server of our own; a fresh KV v2 mount either way.
        vault_external = bool(os.environ.get("VAULT_ADDR"))
        if vault_external:
            vault_url = os.environ["VAULT_ADDR"].rstrip("/")
            vault_token = os.environ.get("VAULT_TOKEN") or ""
            if not vault_token:
                raise ConfigError("VAULT_ADDR is set but VAULT_TOKEN is not; the demo needs a token that can enable a KV mount")
        else:
            vault = start_dev_server()  # OpenBaoNotFound (a ConfigError) says in one line how to get `bao`
            stack.callback(vault.stop)
            vault_url, vault_token = vault.addr, vault.token
        vault_mount = f"kr-demo-{uuid.uuid4().hex[:8]}"
        _enable_kv2(vault_url, vault_token, vault_mount)
        if vault_external and not keep:  # leave the operator's Vault as we found it
            stack.callback(_disable_mount, vault_url, vault_token, vault_mount)

        workdir = Path(tempfile.mkdtemp(prefix="keyrotor-demo-"))
        if not keep:
            stack.callback(shutil.rmtree, workdir, True)
        db_path = workdir / "keyrotor.db"
        log_path = workdir / "keyrotor.log"
        log_file = stack.enter_context(open(log_path, "w", encoding="utf-8"))
        # Every log line of the service goes to a file the leak check scans afterwards.
        configure_logging("INFO", "json", stream=log_stream or log_file)


        provider = start_provider_in_thread(host="127.0.0.1", port=0, activation_delay=activation_delay_s)
        stack.callback(provider.stop)

        settings_url = os.environ.get("KEYROTOR_REDIS_URL") or get_settings().redis_url
        broker_kind = "redis" if os.environ.get("KEYROTOR_REDIS_URL") and redis_reachable(settings_url) else "stub"
        queue_namespace = f"keyrotor-demo-{uuid.uuid4().hex[:8]}"
        webhook_secret = secrets.token_urlsafe(24)

        database_url = f"sqlite:///{db_path}"
        os.environ.update({
            "KEYROTOR_DATABASE_URL": database_url,
            "VAULT_ADDR": vault_url,
            "VAULT_TOKEN": vault_token,
            "KEYROTOR_VAULT_MOUNT": vault_mount,
            "KEYROTOR_QUEUE_NAMESPACE": queue_namespace,
            "KEYROTOR_METRICS_PORT": "0",
            "KEYROTOR_DEMO_PROVIDER_ADMIN_TOKEN": provider.admin_token,
            "KEYROTOR_DEMO_WEBHOOK_SECRET": webhook_secret,
        })
        get_settings.cache_clear()
        upgrade(database_url)
        engine = engine_for(database_url)
        stack.callback(engine.dispose)


        env = cls(
            workdir=workdir, keep_workdir=keep, database_url=database_url, db_path=db_path, log_path=log_path,
            vault_url=vault_url, vault_external=vault_external, vault_mount=vault_mount, provider=provider,
            webhook_secret=webhook_secret, broker_kind=broker_kind, queue_namespace=queue_namespace,
            engine=engine, stack=stack, vault_store=VaultStore.from_settings(get_settings()), _saved_env=saved,
        )
        if broker_kind == "redis":
            stack.callback(_delete_namespace, settings_url, queue_namespace)
        return env

    def start_consumer(self, integration: str, *, key_path: str, key_field: str, probe_interval_s: float = 0.1) -> Any:
        """A consumer stand-in that reads its key from Vault and probes the provider with it."""
        consumer = start_consumer_in_thread(
            host="127.0.0.1", port=0, vault_addr=self.vault_url, vault_token=os.environ["VAULT_TOKEN"],
            mount=self.vault_mount, path=key_path, field=key_field, provider_url=self.provider.url,
            signing_secret=self.webhook_secret, probe_interval=probe_interval_s, load_now=False,
        )
        self.stack.callback(consumer.stop)
        self.consumers[integration] = consumer
        return consumer

    def start_worker(self, *, threads: int = 4) -> None:
        """The pipeline's actors on the demo's broker, served by an in-process Dramatiq worker."""
        settings = get_settings()
        if self.broker_kind == "redis":
            broker = make_redis_broker(settings.redis_url, self.queue_namespace,
                                       heartbeat_timeout_s=settings.broker_heartbeat_timeout_s)
        else:
            broker = make_stub_broker()
        setup_broker(broker=broker)
        context = context_from_settings(settings)
        context.policy = _demo_policy()
        if self.broker_kind == "stub":  # no Redis at all: the providers' shared limiter lives in memory
            context.provider_factory = _in_memory_limited_providers(context.vault)
        configure(context)
        self.stack.callback(reset_broker)
        self.stack.callback(configure, None)
        self.worker = start_worker(broker, threads=threads)
        self.stack.callback(self.worker.stop)

    def close(self) -> None:
        self.stack.close()

    def files_to_scan(self) -> list[Path]:
        return [self.db_path, Path(f"{self.db_path}-wal"), Path(f"{self.db_path}-shm"), self.log_path]


def _enable_kv2(url: str, token: str, mount: str) -> None:
    import hvac

    client = hvac.Client(url=url, token=token, timeout=10)
    client.sys.enable_secrets_engine("kv", path=mount, options={"version": "2"})


def _disable_mount(url: str, token: str, mount: str) -> None:
    import hvac

    try:
        hvac.Client(url=url, token=token, timeout=10).sys.disable_secrets_engine(mount)
    except Exception:  # best effort: a leftover demo mount is harmless and named as such
        pass


def _delete_namespace(url: str, namespace: str) -> None:
    client = redis_client(url, socket_timeout=10)
    try:
        for key in client.scan_iter(match=f"{namespace}*", count=500):
            client.delete(key)
    finally:
        client.close()


def _restore_env(saved: dict[str, Optional[str]]) -> None:
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value

