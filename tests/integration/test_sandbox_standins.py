"""The provider and consumer stand-ins themselves: the HTTP control API, the CLI commands, and the
consumer's probe loop (an overlap rotation causes no failed request; revoking first does)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Iterator

import httpx
import pytest

from worker.inventory.schema import HttpProviderSpec
from worker.providers.base import CheckOutcome
from worker.providers.ratelimit import InMemoryRateLimiter
from worker.providers.registry import build_provider
from keyrotor_sandbox.consumer import start_consumer_in_thread
from keyrotor_sandbox.provider import ProviderHandle, standin_provider_spec, start_provider_in_thread
from worker.secret import Secret
from worker.settings import load_settings
from worker.vault.store import VaultStore

pytestmark = pytest.mark.integration


@pytest.fixture
def provider() -> Iterator[ProviderHandle]:
    handle = start_provider_in_thread()
    yield handle
    handle.stop()


def admin(handle: ProviderHandle) -> dict[str, str]:
    return {"Authorization": f"Bearer {handle.admin_token}"}


# --------------------------------------------------------------------------- provider control API
def test_control_api_needs_the_admin_token(provider: ProviderHandle) -> None:
    key = provider.seed_key()
    assert httpx.get(f"{provider.url}/_sandbox/stats").status_code == 401
    assert httpx.get(f"{provider.url}/_sandbox/stats", headers={"Authorization": f"Bearer {key.secret}"}).status_code == 401


def test_faults_over_http(provider: ProviderHandle) -> None:
    key = provider.seed_key()
    me = f"{provider.url}/api/user/me"
    bearer = {"Authorization": f"Bearer {key.secret}"}
    r = httpx.post(f"{provider.url}/_sandbox/faults", headers=admin(provider),
                   json={"route": "check", "status": 500, "count": 2})
    assert r.status_code == 204
    assert [httpx.get(me, headers=bearer).status_code for _ in range(3)] == [500, 500, 200]
    httpx.post(f"{provider.url}/_sandbox/faults", headers=admin(provider), json={"route": "check", "garbage": True})
    garbage = httpx.get(me, headers=bearer)
    assert garbage.status_code == 200 and garbage.headers["content-type"].startswith("text/html")
    bad = httpx.post(f"{provider.url}/_sandbox/faults", headers=admin(provider), json={"route": "nope", "status": 500})
    assert bad.status_code == 400
    stats = httpx.get(f"{provider.url}/_sandbox/stats", headers=admin(provider)).json()
    assert stats["routes"]["check"] == {"500": 2, "200": 2}


def test_config_seed_and_deprecation_over_http(provider: ProviderHandle) -> None:
    seeded = httpx.post(f"{provider.url}/_sandbox/keys", headers=admin(provider),
                        json={"name": "legacy", "credentialType": "api_key"}).json()
    bearer = {"Authorization": f"Bearer {seeded['apiKey']}"}
    me = f"{provider.url}/api/user/me"
    assert httpx.get(me, headers=bearer).status_code == 200
    httpx.post(f"{provider.url}/_sandbox/deprecation", headers=admin(provider), json={"credential_type": "api_key", "phase": "amnesty"})
    assert httpx.get(me, headers=bearer).status_code == 434
    assert httpx.get(me, headers={**bearer, "Asana-Amnesty-Api-Key": "true"}).status_code == 200
    httpx.post(f"{provider.url}/_sandbox/config", headers=admin(provider), json={"rate_limit": {"requests": 1, "per": 60}})
    assert httpx.get(me, headers={**bearer, "Asana-Amnesty-Api-Key": "true"}).status_code == 200
    limited = httpx.get(me, headers={**bearer, "Asana-Amnesty-Api-Key": "true"})
    assert limited.status_code == 429 and 1 <= int(limited.headers["Retry-After"]) <= 60


def test_an_existing_key_may_mint_keys_and_revoke_its_own(provider: ProviderHandle) -> None:
    key = provider.seed_key(owner="alice")
    bearer = {"Authorization": f"Bearer {key.secret}"}
    created = httpx.post(f"{provider.url}/api/api-key", headers=bearer, json={"name": "keyrotor-x"})
    assert created.status_code == 201 and set(created.json()) >= {"id", "name", "apiKey", "createdAt", "expiresAt"}
    assert provider.key(created.json()["id"]).owner == "alice"
    other = provider.seed_key(owner="bob")
    assert httpx.delete(f"{provider.url}/api/api-key/{other.id}", headers=bearer).status_code == 403
    assert httpx.delete(f"{provider.url}/api/api-key/{created.json()['id']}", headers=bearer).status_code == 204


# --------------------------------------------------------------------------- CLI
def _start(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli.main", "sandbox", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    return proc, line


def _stop(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=10)


def test_cli_provider_prints_one_ready_line_and_serves(tmp_path) -> None:  # type: ignore[no-untyped-def]
    token = "cli-admin-" + uuid.uuid4().hex
    proc, line = _start(["provider", "--port", "0", "--rate-limit", "100/60s", "--deprecate", "api_key=amnesty"],
                        {"KEYROTOR_SANDBOX_PROVIDER_ADMIN_TOKEN": token})
    try:
        assert line.startswith("provider stand-in listening on http://127.0.0.1:"), line
        url = line.rsplit(" ", 1)[-1]
        created = httpx.post(f"{url}/api/api-key", headers={"Authorization": f"Bearer {token}"},
                             json={"name": "keyrotor-cli", "credentialType": "personal_access_token"})
        assert created.status_code == 201
        assert token not in line
    finally:
        assert _stop(proc) == 0


def test_cli_asana_prints_one_ready_line_and_serves_its_timeline() -> None:
    token = "asana-ctl-" + uuid.uuid4().hex
    proc, line = _start(["asana", "--port", "0", "--today", "2017-01-15"], {"KEYROTOR_SANDBOX_ASANA_CONTROL_TOKEN": token})
    try:
        assert line.startswith("asana stand-in listening on http://127.0.0.1:") and token not in line, line
        url = line.rsplit(" ", 1)[-1]
        made = httpx.post(f"{url}/_sandbox/ui/pat", json={"user": "alice", "name": "cli"},
                          headers={"Authorization": f"Bearer {token}"}).json()
        assert httpx.get(f"{url}/api/1.0/users/me", headers={"Authorization": f"Bearer {made['token']}"}).status_code == 200
        assert httpx.get(f"{url}/api/1.0/users/me").status_code == 401
    finally:
        assert _stop(proc) == 0
    bad = subprocess.run([sys.executable, "-m", "worker.cli.main", "sandbox", "asana", "--control-token", "x",
                          "--plan", "gold"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "--plan 'gold'" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_rejects_bad_rate_limit() -> None:
    result = subprocess.run([sys.executable, "-m", "worker.cli.main", "sandbox", "provider", "--admin-token", "x",
                             "--rate-limit", "lots"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "REQUESTS/PER" in result.stderr


def test_cli_consumer(vault, vault_mount, provider: ProviderHandle) -> None:  # type: ignore[no-untyped-def]
    key = provider.seed_key()
    store = VaultStore.from_settings(load_settings(VAULT_ADDR=vault.addr, VAULT_TOKEN=vault.token, vault_mount=vault_mount))
    store.write(vault_mount, "apps/cli", {"api_key": key.secret})
    proc, line = _start(["consumer", "--port", "0", "--mount", vault_mount, "--path", "apps/cli",
                         "--provider-url", provider.url],
                        {"VAULT_ADDR": vault.addr, "VAULT_TOKEN": vault.token,
                         "KEYROTOR_SANDBOX_CONSUMER_SIGNING_SECRET": "s3cret-signing"})
    try:
        assert line.startswith("consumer stand-in listening on http://127.0.0.1:"), line
        url = line.split(" ")[4]
        assert httpx.get(f"{url}/health").json()["fingerprint"] == Secret(key.secret).fingerprint
    finally:
        assert _stop(proc) == 0


# --------------------------------------------------------------------------- consumer probe: no outage
def _rotation_setup(vault, vault_mount, provider: ProviderHandle):  # type: ignore[no-untyped-def]
    store = VaultStore.from_settings(load_settings(VAULT_ADDR=vault.addr, VAULT_TOKEN=vault.token, vault_mount=vault_mount))
    old = provider.seed_key("initial")
    store.write(vault_mount, "apps/probe", {"api_key": old.secret, "keyrotor_key_id": old.id})
    spec = HttpProviderSpec.model_validate(standin_provider_spec(provider.url, admin_token_ref={"env": "A"}))
    client = build_provider(spec, name="standin", resolve=lambda ref: Secret(provider.admin_token),
                            limiter=InMemoryRateLimiter())
    consumer = start_consumer_in_thread(vault_addr=vault.addr, vault_token=vault.token, mount=vault_mount,
                                        path="apps/probe", provider_url=provider.url, signing_secret="sig",
                                        probe_interval_ms=10)
    return store, old, client, consumer


def _wait_probes(consumer, at_least: int) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 5
    start = consumer.stats()["probes"]
    while consumer.stats()["probes"] < start + at_least and time.monotonic() < deadline:
        time.sleep(0.01)


def test_overlap_rotation_causes_no_consumer_failure(vault, vault_mount, provider: ProviderHandle) -> None:  # type: ignore[no-untyped-def]
    provider.configure(activation_delay=0.2)
    store, old, client, consumer = _rotation_setup(vault, vault_mount, provider)
    try:
        _wait_probes(consumer, 5)
        new = client.issue(name="keyrotor-probe", credential_type="api_key", labels={})
        assert client.wait_until_live(new.secret, "api_key", timeout=5, poll_interval=0.05) is CheckOutcome.valid
        store.write(vault_mount, "apps/probe", {"api_key": new.secret.reveal(), "keyrotor_key_id": new.key_id or ""})
        consumer.consumer.reload()  # what the webhook triggers
        _wait_probes(consumer, 5)
        client.revoke(key_id=old.id, secret=None, credential_type="api_key")
        _wait_probes(consumer, 5)
        stats = consumer.stats()
        assert stats["probes"] >= 15
        assert stats["probe_failures"] == 0, stats
        assert stats["fingerprint"] == new.secret.fingerprint
    finally:
        consumer.stop()


def test_revoking_before_the_consumer_reloads_is_an_outage(vault, vault_mount, provider: ProviderHandle) -> None:  # type: ignore[no-untyped-def]
    store, old, client, consumer = _rotation_setup(vault, vault_mount, provider)
    try:
        _wait_probes(consumer, 3)
        client.issue(name="keyrotor-bad", credential_type="api_key", labels={})
        client.revoke(key_id=old.id, secret=None, credential_type="api_key")  # the invariant-2 violation
        _wait_probes(consumer, 3)
        stats = consumer.stats()
        assert stats["probe_failures"] >= 1 and stats["failure_statuses"].get("401", 0) >= 1
    finally:
        consumer.stop()


def test_garbage_credentials_and_bodies_are_client_errors(provider: ProviderHandle) -> None:
    """A non-ASCII Bearer token is a 401 (was a 500: compare_digest refuses non-ASCII str); a
    credentialType that is not a string is a 400 (was stringified into a key type)."""
    import socket

    host, port = provider.url.split("//", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"GET /api/user/me HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer caf\xe9\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 401"), answer[:80]
    admin = {"Authorization": f"Bearer {provider.admin_token}"}
    response = httpx.post(f"{provider.url}/api/api-key", headers=admin, json={"name": "x", "credentialType": {"a": 1}}, timeout=5)
    assert response.status_code == 400
