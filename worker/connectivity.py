"""Can this process reach its dependencies? One check each for the database, Redis and Vault
(with a real login: Kubernetes auth or the token), used by ``keyrotor ping`` and the chart's
``helm test`` Pod. Details name hosts and versions, never a password or token."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Optional

from worker.settings import Settings
from worker.urls import display_url
from worker.db.session import make_engine, postgres_engine_options
from worker.redis_conn import is_sentinel_url, redis_client
from worker.vault.store import VaultStore

if TYPE_CHECKING:
    from worker.vault.store import VaultStore


@dataclass(frozen=True)
class Check:
    name: str       # database | redis | vault
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def check_database(settings: Settings, timeout_s: float = 5.0) -> Check:
    from sqlalchemy import NullPool, text
    from sqlalchemy.engine import make_url


    url = make_url(settings.database_url)
    where = url.render_as_string(hide_password=True)
    options: dict[str, Any] = {}
    if url.get_backend_name() == "postgresql":
        options = postgres_engine_options(pooled=False, settings=settings)
        options["connect_args"]["connect_timeout"] = max(1, int(timeout_s))
    engine = make_engine(settings.database_url, poolclass=NullPool, **options)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            try:
                revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
            except Exception:
                revision = None
    except Exception as exc:
        return Check("database", False, f"cannot connect to {where}: {_first_line(exc)}")
    finally:
        engine.dispose()
    if revision is None:
        return Check("database", False, f"{where}: connected, but the schema is not migrated: run `keyrotor db upgrade`")
    return Check("database", True, f"{where}: connected, schema revision {revision}")


def check_redis(settings: Settings, timeout_s: float = 5.0) -> Check:
    where = display_url(settings.redis_url)
    client = redis_client(settings.redis_url, socket_timeout=timeout_s)
    try:
        client.ping()
        version = client.info("server").get("redis_version", "?")
        master = None
        if is_sentinel_url(settings.redis_url):  # which master the sentinels named
            host, port = client.connection_pool.get_master_address()
            master = f"{host}:{port}"
    except Exception as exc:
        return Check("redis", False, f"{where} does not answer PING: {_first_line(exc)}")
    finally:
        client.close()
    if master:
        return Check("redis", True, f"{where}: PING answered by master {master}, Redis {version}")
    return Check("redis", True, f"{where}: PING answered, Redis {version}")


def open_vault(settings: Settings) -> tuple[Optional["VaultStore"], Check]:
    """A logged-in store (``None`` unless the check passed) and the check that says so."""
    if not settings.vault_addr:
        return None, Check("vault", True, "VAULT_ADDR is not set: skipped (nothing can be rotated without Vault)")

    try:
        store = VaultStore.from_settings(settings)
        health = store.health()
    except Exception as exc:  # e.g. the Kubernetes token file is missing
        return None, Check("vault", False, f"{settings.vault_addr}: {_first_line(exc)}")
    if not health.reachable:
        return None, Check("vault", False, f"{settings.vault_addr}: unreachable: {health.detail}")
    if not health.initialized or health.sealed:
        return None, Check("vault", False, f"{settings.vault_addr}: {'sealed' if health.sealed else 'not initialized'}")
    if health.token_valid is not True:
        return None, Check("vault", False, f"{settings.vault_addr}: login or token check failed: {health.detail}")
    return store, Check("vault", True, f"{settings.vault_addr}: logged in, Vault {health.version or '?'}")


def check_vault(settings: Settings) -> Check:
    return open_vault(settings)[1]


def check_all(settings: Settings, timeout_s: float = 5.0) -> list[Check]:
    return [check_database(settings, timeout_s), check_redis(settings, timeout_s), check_vault(settings)]
