"""The collaborators a step needs, injected: database, Vault, provider and integration factories,
retry/timing policy, notifier. Tests and the demo build one with fakes or stand-ins; the worker
process builds one from settings (``context_from_settings``) the first time a step runs.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

from sqlalchemy.engine import Engine
from sqlmodel import Session

from worker.integrations.base import Integration
from worker.providers.base import Provider
from worker.db.models import IntegrationRecord, ManagedKey, ProviderRecord
from worker.db.session import engine_for
from worker.errors import PermanentError
from worker.integrations.registry import build_integration
from worker.notify import notify_function
from worker.pipeline.restart_batch import DatabaseBatchView
from worker.providers.ratelimit import shared_limiter
from worker.providers.registry import provider_builder
from worker.secret_refs import make_resolver
from worker.settings import get_settings
from worker.vault.secret_store import SecretStore
from worker.vault.store import VaultStore


class NotifyFn(Protocol):
    def __call__(self, event: str, *, key_name: str, run_id: Optional[str], detail: dict[str, Any]) -> None: ...


#: (session, key) → the key's provider
ProviderFactory = Callable[[Session, ManagedKey], Provider]
#: (session, integration name) → the integration
IntegrationFactory = Callable[[Session, str], Integration]


@dataclass(frozen=True)
class StepPolicy:
    """Retry budget and timings of pipeline steps.

    ``max_retries`` bounds every step (invariant 8); delays grow from ``min_backoff_ms`` to
    ``max_backoff_ms`` with jitter; a server's Retry-After is a floor, capped at
    ``max_retry_after_s`` so a garbage header cannot park a run for days.
    """

    max_retries: int = 8
    min_backoff_ms: int = 2_000
    max_backoff_ms: int = 300_000
    max_retry_after_s: float = 3_600.0
    time_limit_ms: int = 120_000          # one execution of one step (Dramatiq TimeLimit)
    activation_poll_s: float = 2.0        # precheck: how often to ask whether a new key is live
    activation_timeout_s: float = 120.0   # precheck: give up (compensate) after this long
    revocation_timeout_s: float = 120.0   # retire: how long a revoked key may still authenticate
    lease_ttl_s: float = 10.0             # a step's run lease lapses this long after its last renewal
    missing_run_retries: int = 5          # a message for a run this worker cannot read (yet): retries
    missing_run_backoff_ms: int = 250     # ... first delay, doubling, jittered

    @classmethod
    def from_settings(cls, settings: Any) -> "StepPolicy":
        """The operator-tunable part comes from ``KEYROTOR_STEP_*`` / ``KEYROTOR_ACTIVATION_*``."""
        return cls(
            max_retries=settings.step_max_retries,
            min_backoff_ms=int(settings.step_min_backoff_s * 1000),
            max_backoff_ms=int(settings.step_max_backoff_s * 1000),
            time_limit_ms=int(settings.step_time_limit_s * 1000),
            activation_poll_s=settings.activation_poll_s,
            activation_timeout_s=settings.activation_timeout_s,
        )


def default_policy() -> StepPolicy:
    """The policy of this process's settings (for code that runs without a PipelineContext)."""
    return StepPolicy.from_settings(get_settings())


@dataclass
class PipelineContext:
    engine: Engine
    vault: SecretStore                          # VaultStore in production, a fake in tests
    provider_factory: ProviderFactory
    integration_factory: IntegrationFactory
    policy: StepPolicy = field(default_factory=StepPolicy)
    actor: str = field(default_factory=lambda: f"worker:{socket.gethostname()}")
    notify: Optional[NotifyFn] = None
    #: How secret references are resolved; the factories of ``context_from_settings`` use the same
    #: one. ``None``: environment variables and this context's Vault.
    resolve: Optional[Callable[[Any], Any]] = None

    def resolver(self) -> Callable[[Any], Any]:
        if self.resolve is None:
            self.resolve = make_resolver(self.vault)
        return self.resolve


_lock = threading.Lock()
_context: Optional[PipelineContext] = None


def configure(context: Optional[PipelineContext]) -> None:
    """Install the process-wide context used by the actors (``None`` resets it)."""
    global _context
    with _lock:
        _context = context


def get_context() -> PipelineContext:
    """The process-wide context; built from settings on first use if nobody configured one."""
    global _context
    with _lock:
        if _context is None:
            _context = context_from_settings()
        return _context


def context_from_settings(settings: Any = None) -> PipelineContext:
    """Real collaborators: the settings' database, Vault, the provider and integration registries."""
    settings = settings or get_settings()



    vault = VaultStore.from_settings(settings)
    engine = engine_for(settings.database_url)
    resolve = make_resolver(vault)
    return PipelineContext(
        engine=engine,
        vault=vault,
        provider_factory=_registry_provider_factory(vault, settings, resolve),
        integration_factory=_registry_integration_factory(vault, settings, resolve, engine=engine),
        resolve=resolve,
        policy=StepPolicy.from_settings(settings),
        # Sinks of the inventory applied to *this* context's database, references resolved via
        # its Vault: never the process's default settings (a context for another database).
        notify=notify_function(engine, settings, vault=vault),
    )


class _BuiltCache:
    """Adapters built from applied records, reused across steps and threads.

    Building one per step leaked an httpx client (connection pool) per call in a long-running
    worker, and re-registered the rate limit each time. An entry is rebuilt when its record's spec
    changes (``keyrotor config apply``) and the replaced one is closed (a call still in flight
    on it, or made later by a chain that holds it, fails as a transient error, and its step is
    retried with the new one)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._built: dict[str, tuple[str, Any]] = {}

    def get(self, name: str, spec: Any, build: Callable[[], Any]) -> Any:
        import json

        digest = json.dumps(spec, sort_keys=True, default=str)
        with self._lock:
            cached = self._built.get(name)
            if cached is not None and cached[0] == digest:
                return cached[1]
            adapter = build()
            self._built[name] = (digest, adapter)
        if cached is not None:
            _close_quietly(cached[1])
        return adapter


def _close_quietly(adapter: Any) -> None:
    close = getattr(adapter, "close", None) or getattr(getattr(adapter, "_http", None), "close", None)
    if close is None:
        return
    try:
        close()
    except Exception:  # closing an old client must never fail a step
        pass


def _registry_provider_factory(vault: VaultStore, settings: Any, resolve: Optional[Callable[[Any], Any]] = None) -> ProviderFactory:
    resolve = resolve or make_resolver(vault)
    cache: dict[str, Any] = {}
    built = _BuiltCache()

    def factory(session: Session, key: ManagedKey) -> Any:
        record = session.get(ProviderRecord, key.provider)
        if record is None:
            raise PermanentError(f"provider {key.provider!r} of key {key.name!r} is not in the applied inventory; "
                                 "run `keyrotor config apply`")
        return built.get(record.name, {"mode": record.mode, "spec": record.spec},
                         lambda: provider_builder(resolve, _limiter(settings, cache))(record))

    return factory


_limiter_lock = threading.Lock()


def _limiter(settings: Any, cache: dict[str, Any]) -> Any:
    """The providers' shared (Redis-backed) rate limiter, one per process (invariant 8)."""
    with _limiter_lock:
        if "limiter" not in cache:
            cache["limiter"] = shared_limiter(settings.redis_url, namespace=settings.queue_namespace)
        return cache["limiter"]


def _engine_of(session: Session) -> Engine:
    bind = session.get_bind()
    return bind if isinstance(bind, Engine) else bind.engine  # a session bound to a connection: its engine


def _registry_integration_factory(vault: VaultStore, settings: Any, resolve: Optional[Callable[[Any], Any]] = None,
                                  *, engine: Optional[Engine] = None) -> IntegrationFactory:
    resolve = resolve or make_resolver(vault)
    built = _BuiltCache()

    def factory(session: Session, name: str) -> Any:
        record = session.get(IntegrationRecord, name)
        if record is None:
            raise PermanentError(f"integration {name!r} is not in the applied inventory; run `keyrotor config apply`")
        batch = DatabaseBatchView(engine if engine is not None else _engine_of(session))
        return built.get(record.name, record.spec, lambda: build_integration(record, vault=vault, resolve=resolve,
                                                                             batch=batch, settings=settings))

    return factory
