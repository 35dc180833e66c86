"""Integrations over real HTTP: the signed webhook against the consumer stand-in (reload from
OpenBao, health fingerprint, tampered/stale signatures refused) and vault_copy against Vault."""

from __future__ import annotations

import time
import uuid
from typing import Any, Iterator

import httpx
import hvac
import pytest

from worker.errors import PermanentError
from worker.integrations.base import Announcement, VerifyStatus
from worker.integrations.registry import build_integration
from worker.integrations.signing import sign
from worker.inventory.schema import VaultCopyIntegrationSpec, WebhookIntegrationSpec
from keyrotor_sandbox.consumer import ConsumerHandle, start_consumer_in_thread
from keyrotor_sandbox.provider import ProviderHandle, start_provider_in_thread
from worker.secret import Secret
from worker.settings import load_settings
from worker.vault.store import VaultStore

pytestmark = pytest.mark.integration

SIGNING = "whsec-" + uuid.uuid4().hex


@pytest.fixture
def store(vault, vault_mount) -> VaultStore:  # type: ignore[no-untyped-def]
    settings = load_settings(VAULT_ADDR=vault.addr, VAULT_TOKEN=vault.token, vault_mount=vault_mount, vault_timeout_s=5.0)
    return VaultStore.from_settings(settings, sleep=lambda s: None)


@pytest.fixture
def provider() -> Iterator[ProviderHandle]:
    handle = start_provider_in_thread()
    yield handle
    handle.stop()


@pytest.fixture
def consumer(vault, vault_mount, store: VaultStore, provider: ProviderHandle) -> Iterator[ConsumerHandle]:  # type: ignore[no-untyped-def]
    first = provider.seed_key("initial")
    store.write(vault_mount, "apps/reporting/alloy", {"api_key": first.secret, "keyrotor_key_id": first.id})
    handle = start_consumer_in_thread(vault_addr=vault.addr, vault_token=vault.token, mount=vault_mount,
                                      path="apps/reporting/alloy", field="api_key", provider_url=provider.url,
                                      signing_secret=SIGNING)
    yield handle
    handle.stop()


def rotate_in_vault(store: VaultStore, mount: str, provider: ProviderHandle) -> tuple[Secret, int, str]:
    key = provider.seed_key("keyrotor-run1")
    version = store.write(mount, "apps/reporting/alloy", {"api_key": key.secret, "keyrotor_key_id": key.id})
    return Secret(key.secret), version, key.id


def webhook(consumer: ConsumerHandle, **spec: Any):  # type: ignore[no-untyped-def]
    data = {"kind": "webhook", "url": consumer.webhook_url, "signing_secret": {"env": "SIGN"},
            "health_url": consumer.health_url, **spec}
    return build_integration(WebhookIntegrationSpec.model_validate(data), name="reporting-service", vault=None,
                             resolve=lambda ref: Secret(SIGNING), sleep=lambda s: None)


def announce(secret: Secret, version: int, key_id: str, mount: str) -> Announcement:
    return Announcement(event="rotated", key_name="alloy/reporting", run_id="run1", provider_key_id=key_id,
                        fingerprint=secret.fingerprint, vault_mount=mount, vault_path="apps/reporting/alloy",
                        vault_version=version, secret=secret)


def test_webhook_makes_consumer_reload_and_health_confirms(consumer: ConsumerHandle, store: VaultStore,
                                                           vault_mount: str, provider: ProviderHandle) -> None:
    old_fp = consumer.fingerprint
    secret, version, key_id = rotate_in_vault(store, vault_mount, provider)
    ann = announce(secret, version, key_id, vault_mount)
    integration = webhook(consumer)

    before = integration.verify(ann)  # the consumer still holds the old key
    assert before.status is VerifyStatus.mismatch and before.reported_fingerprint == old_fp

    integration.push(ann)
    assert consumer.fingerprint == secret.fingerprint
    assert consumer.stats()["vault_version"] == version
    assert integration.verify(ann).status is VerifyStatus.ok
    stats = consumer.stats()
    assert stats["webhooks_accepted"] == 1 and stats["events"] == ["rotated"]


def test_consumer_health_reports_a_revoked_key(consumer: ConsumerHandle, store: VaultStore, vault_mount: str,
                                               provider: ProviderHandle) -> None:
    current = store.read_current(vault_mount, "apps/reporting/alloy", "api_key")
    assert current is not None and current.provider_key_id
    provider.state.keys[current.provider_key_id].revoked = True
    health = httpx.get(consumer.health_url).json()
    assert health == {"ok": False, "fingerprint": current.secret.fingerprint, "provider_status": 401,
                      "vault_version": current.version}


def test_consumer_rejects_bad_signatures(consumer: ConsumerHandle, store: VaultStore, vault_mount: str,
                                         provider: ProviderHandle) -> None:
    old_fp = consumer.fingerprint
    rotate_in_vault(store, vault_mount, provider)
    body = b'{"event":"rotated","vault":{"mount":"%s","path":"apps/reporting/alloy"}}' % vault_mount.encode()
    now = int(time.time())
    cases = {
        "tampered": (body + b" ", sign(SIGNING, body, timestamp=now)),
        "stale": (body, sign(SIGNING, body, timestamp=now - 301)),
        "wrong secret": (body, sign("not-the-secret", body, timestamp=now)),
        "unsigned": (body, None),
    }
    for name, (content, header) in cases.items():
        headers = {"Content-Type": "application/json"}
        if header:
            headers["X-Keyrotor-Signature"] = header
        response = httpx.post(consumer.webhook_url, content=content, headers=headers)
        assert response.status_code == 401, name
    assert consumer.fingerprint == old_fp  # nothing reloaded
    assert consumer.stats()["webhooks_rejected"] == 4
    ok = httpx.post(consumer.webhook_url, content=body, headers={"X-Keyrotor-Signature": sign(SIGNING, body, timestamp=now)})
    assert ok.status_code == 200 and consumer.fingerprint != old_fp


def test_webhook_with_wrong_signing_secret_is_permanent(consumer: ConsumerHandle, store: VaultStore,
                                                         vault_mount: str, provider: ProviderHandle) -> None:
    secret, version, key_id = rotate_in_vault(store, vault_mount, provider)
    data = {"kind": "webhook", "url": consumer.webhook_url, "signing_secret": {"env": "SIGN"}}
    integration = build_integration(WebhookIntegrationSpec.model_validate(data), name="x", vault=None,
                                    resolve=lambda ref: Secret("wrong-" + SIGNING), sleep=lambda s: None)
    with pytest.raises(PermanentError, match="signing secret"):
        integration.push(announce(secret, version, key_id, vault_mount))


def test_vault_copy_writes_reads_back_and_a_redelivery_writes_the_same_value(store: VaultStore, vault, vault_mount: str) -> None:  # type: ignore[no-untyped-def]
    spec = VaultCopyIntegrationSpec.model_validate({"kind": "vault_copy", "mount": vault_mount, "path": "billing/{key_slug}", "field": "token"})
    integration = build_integration(spec, name="billing-app-copy", vault=store, resolve=lambda ref: Secret("unused"))
    secret = Secret("sk_copy_" + uuid.uuid4().hex)
    ann = Announcement(event="rotated", key_name="alloy/billing", run_id="r2", provider_key_id="kid-7",
                       fingerprint=secret.fingerprint, vault_mount="secret", vault_path="apps/billing/alloy",
                       vault_version=4, secret=secret)
    assert integration.verify(ann).status is VerifyStatus.mismatch  # nothing there yet

    integration.push(ann)
    integration.push(ann)  # re-delivery: written without reading first, the same value again
    client = hvac.Client(url=vault.addr, token=vault.token)
    for version in (1, 2):
        read = client.secrets.kv.v2.read_secret_version(path="billing/alloy-billing", mount_point=vault_mount,
                                                        version=version, raise_on_deleted_version=True)
        assert read["data"]["data"] == {"token": secret.reveal(), "keyrotor_key_id": "kid-7"}
    assert read["data"]["metadata"]["version"] == 2
    assert integration.verify(ann).status is VerifyStatus.ok

    other = Secret("sk_other_" + uuid.uuid4().hex)
    store.write(vault_mount, "billing/alloy-billing", {"token": other.reveal()})
    result = integration.verify(ann)
    assert result.status is VerifyStatus.mismatch and result.reported_fingerprint == other.fingerprint


def test_consumer_ignoring_updates_is_caught_by_verify(consumer: ConsumerHandle, store: VaultStore,
                                                       vault_mount: str, provider: ProviderHandle) -> None:
    old_fp = consumer.fingerprint
    consumer.ignore_updates(True)
    secret, version, key_id = rotate_in_vault(store, vault_mount, provider)
    ann = announce(secret, version, key_id, vault_mount)
    integration = webhook(consumer)
    integration.push(ann)  # accepted, but the application keeps its old key
    result = integration.verify(ann)
    assert result.status is VerifyStatus.mismatch and result.reported_fingerprint == old_fp


def test_consumer_started_before_its_key_exists(vault, vault_mount, provider: ProviderHandle, store: VaultStore) -> None:  # type: ignore[no-untyped-def]
    handle = start_consumer_in_thread(vault_addr=vault.addr, vault_token=vault.token, mount=vault_mount,
                                      path="apps/later", probe_url=f"{provider.url}/api/user/me",
                                      signing_secret=SIGNING, probe_interval=0.01)
    try:
        assert handle.fingerprint is None
        time.sleep(0.05)
        assert handle.stats()["probes"] == 0  # no key: no calls, no false failures
        key = provider.seed_key()
        store.write(vault_mount, "apps/later", {"api_key": key.secret})
        assert httpx.get(handle.health_url).json()["ok"] is True  # /health loads on demand
        assert handle.fingerprint == Secret(key.secret).fingerprint
    finally:
        handle.stop()
