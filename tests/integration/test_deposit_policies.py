"""The two shipped policies of assisted mode, loaded unchanged into the real OpenBao server:
an owner (config/vault-owner-deposit-policy.hcl) writes a deposit but cannot read, list or delete
it; keyrotor (config/vault-policy.hcl) reads it with its metadata and destroys every version."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import hvac
import pytest

from worker.secret import Secret
from worker.vault.store import VaultStore
from worker.vault.auth import TokenAuth
from worker.vault.transport import build_client

OWNER_POLICY = Path(__file__).resolve().parents[2] / "config" / "vault-owner-deposit-policy.hcl"


def _store(vault: Any, token: str) -> VaultStore:
    return VaultStore(build_client(vault.addr, timeout=5.0), TokenAuth(token), addr=vault.addr, staging_mount="secret",
                      retry_attempts=1)


def test_owner_writes_only_and_keyrotor_reads_and_destroys(vault: Any, shipped_policy_token: str) -> None:
    key_name = f"asana/pat-{uuid.uuid4().hex[:6]}"
    keyrotor = _store(vault, shipped_policy_token)
    slug = keyrotor.deposit_path(key_name).rsplit("/", 1)[-1]
    root = hvac.Client(url=vault.addr, token=vault.token)
    name = f"owner-{slug}"
    root.sys.create_or_update_acl_policy(name=name, policy=OWNER_POLICY.read_text().replace("KEY_SLUG", slug))
    token = root.auth.token.create(policies=[name], no_default_policy=True, ttl="5m")["auth"]["client_token"]
    owner = hvac.Client(url=vault.addr, token=token)
    path = keyrotor.deposit_path(key_name)

    owner.secrets.kv.v2.create_or_update_secret(path=path, secret={"credential": "pat-1", "deposited_by": "alice"},
                                                mount_point="secret")
    owner.secrets.kv.v2.create_or_update_secret(path=path, secret={"credential": "pat-2", "deposited_by": "alice"},
                                                mount_point="secret")   # update: a second write before pickup
    for attempt in (lambda: owner.secrets.kv.v2.read_secret_version(path=path, mount_point="secret",
                                                                    raise_on_deleted_version=True),
                    lambda: owner.secrets.kv.v2.read_secret_metadata(path=path, mount_point="secret"),
                    lambda: owner.secrets.kv.v2.delete_metadata_and_all_versions(path=path, mount_point="secret"),
                    lambda: owner.secrets.kv.v2.create_or_update_secret(path=path + "-other", secret={"credential": "x"},
                                                                        mount_point="secret")):
        with pytest.raises(hvac.exceptions.Forbidden):
            attempt()

    found = keyrotor.read_deposit(key_name)
    assert found is not None and found.secret == Secret("pat-2") and found.claimed_by == "alice"
    assert found.version == 2 and found.created_at is not None
    keyrotor.destroy_deposit(key_name)
    assert keyrotor.read_deposit(key_name) is None
    with pytest.raises(hvac.exceptions.InvalidPath):   # metadata gone too: no version left to undelete
        root.secrets.kv.v2.read_secret_metadata(path=path, mount_point="secret")
    keyrotor.destroy_deposit(key_name)   # idempotent
