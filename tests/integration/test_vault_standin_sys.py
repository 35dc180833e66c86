"""Mounts, health, policies, tokens and ACL enforcement through hvac over HTTP, against the
stand-in (or a real Vault when VAULT_ADDR is set)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import hvac
import pytest
import requests
from hvac import exceptions

from worker.clock import set_clock
from worker.sandbox.vault.server import start_in_thread

pytestmark = pytest.mark.integration
DENIED = "1 error occurred:\n\t* permission denied\n\n"


@pytest.fixture
def root(vault):  # type: ignore[no-untyped-def]
    c = hvac.Client(url=vault.addr, token=vault.token)
    yield c
    c.adapter.close()


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def limited_client(vault, root, policy_text: str, **create):  # type: ignore[no-untyped-def]
    policy = _name("pol")
    root.sys.create_or_update_policy(policy, policy_text)
    token = root.auth.token.create(policies=[policy], ttl="1h", **create)["auth"]["client_token"]
    return hvac.Client(url=vault.addr, token=token), policy


# --------------------------------------------------------------------------- health
def test_health_codes_and_no_envelope(vault) -> None:  # type: ignore[no-untyped-def]
    response = requests.get(f"{vault.addr}/v1/sys/health", timeout=5)
    assert response.status_code == 200
    body = response.json()
    assert body["initialized"] is True and body["sealed"] is False and body["standby"] is False
    assert "request_id" not in body and isinstance(body["server_time_utc"], int)
    assert response.headers["Content-Type"] == "application/json"
    custom = requests.get(f"{vault.addr}/v1/sys/health", params={"activecode": 299, "standbyok": "true"}, timeout=5)
    assert custom.status_code == 299
    assert requests.head(f"{vault.addr}/v1/sys/health", timeout=5).status_code == 200


def test_sealed_standin_answers_503() -> None:
    handle = start_in_thread(host="127.0.0.1", port=0, root_token="root-seal")
    try:
        client = hvac.Client(url=handle.url, token="root-seal")
        client.sys.seal()
        assert requests.get(f"{handle.url}/v1/sys/health", timeout=5).status_code == 503
        assert requests.get(f"{handle.url}/v1/sys/health", params={"sealedcode": 200}, timeout=5).status_code == 200
        with pytest.raises(exceptions.VaultDown):
            client.secrets.kv.v2.read_secret("x", mount_point="secret", raise_on_deleted_version=True)
        client.sys.submit_unseal_key(handle.app.unseal_key)
        assert client.sys.read_health_status(method="GET")["sealed"] is False
    finally:
        handle.stop()


# --------------------------------------------------------------------------- mounts and routing
def test_enable_list_tune_disable_mounts(root, vault) -> None:  # type: ignore[no-untyped-def]
    path = _name("kv")
    root.sys.enable_secrets_engine("kv", path=path, options={"version": "1"})
    try:
        mounts = root.sys.list_mounted_secrets_engines()["data"]
        assert f"{path}/" in mounts and all(key.endswith("/") for key in mounts)
        assert mounts[f"{path}/"]["type"] == "kv" and mounts[f"{path}/"]["options"] == {"version": "1"}
        with pytest.raises(exceptions.InvalidRequest) as info:
            root.sys.enable_secrets_engine("kv", path=path)
        assert "path is already in use" in info.value.errors[0]
        root.secrets.kv.v1.create_or_update_secret("a", {"v": "1"}, mount_point=path)
        assert root.secrets.kv.v1.read_secret("a", mount_point=path)["data"] == {"v": "1"}
        root.sys.tune_mount_configuration(path, options={"version": "2"})  # Vault upgrades v1 data in place
        assert root.secrets.kv.v2.read_secret("a", mount_point=path, raise_on_deleted_version=True)["data"]["data"] == {"v": "1"}
        tuned = root.sys.read_mount_configuration(path)["data"]
        assert tuned["options"]["version"] == "2" and tuned["default_lease_ttl"] > 0
    finally:
        root.sys.disable_secrets_engine(path)
    assert f"{path}/" not in root.sys.list_mounted_secrets_engines()["data"]
    with pytest.raises(exceptions.InvalidPath):
        root.secrets.kv.v2.read_secret("a", mount_point=path, raise_on_deleted_version=True)


def test_unknown_route_and_method(vault) -> None:  # type: ignore[no-untyped-def]
    headers = {"X-Vault-Token": vault.token}
    missing = requests.get(f"{vault.addr}/v1/{_name('nowhere')}/x", headers=headers, timeout=5)
    assert missing.status_code == 404
    assert "no handler for route" in missing.json()["errors"][0]
    assert missing.headers["Content-Type"] == "application/json"
    wrong = requests.request("TRACE", f"{vault.addr}/v1/sys/mounts", headers=headers, timeout=5)
    assert wrong.status_code == 405


# --------------------------------------------------------------------------- policies
def test_policy_crud_and_list(root) -> None:  # type: ignore[no-untyped-def]
    name = _name("crud")
    text = 'path "secret/data/crud/*" {\n  capabilities = ["read"]\n}\n'
    root.sys.create_or_update_acl_policy(name, text)
    assert root.sys.read_acl_policy(name)["data"] == {"name": name, "policy": text}
    keys = root.sys.list_acl_policies()["data"]["keys"]
    assert name in keys and "default" in keys and "root" in keys
    assert name in root.sys.list_policies()["data"]["policies"]  # legacy sys/policy
    with pytest.raises(exceptions.InvalidRequest):
        root.sys.create_or_update_acl_policy(_name("bad"), 'path "x" { capabilities = ["fly"] }')
    with pytest.raises(exceptions.InvalidRequest):
        root.sys.delete_acl_policy("default")
    root.sys.delete_acl_policy(name)
    with pytest.raises(exceptions.InvalidPath):
        root.sys.read_acl_policy(name)


# --------------------------------------------------------------------------- ACL enforcement
def test_limited_token_read_only(root, vault, vault_mount) -> None:  # type: ignore[no-untyped-def]
    root.secrets.kv.v2.create_or_update_secret("apps/one", {"v": "1"}, mount_point=vault_mount)
    client, _ = limited_client(vault, root, f'''
        path "{vault_mount}/data/apps/*" {{ capabilities = ["read"] }}
        path "{vault_mount}/data/apps/secret" {{ capabilities = ["deny"] }}
    ''')
    kv = client.secrets.kv.v2
    assert kv.read_secret("apps/one", mount_point=vault_mount, raise_on_deleted_version=True)["data"]["data"] == {"v": "1"}
    with pytest.raises(exceptions.Forbidden) as info:
        kv.create_or_update_secret("apps/one", {"v": "2"}, mount_point=vault_mount)
    assert info.value.errors == [DENIED]
    with pytest.raises(exceptions.Forbidden):
        kv.read_secret("apps/secret", mount_point=vault_mount, raise_on_deleted_version=True)
    with pytest.raises(exceptions.Forbidden):
        kv.list_secrets("apps", mount_point=vault_mount)  # list needs "list" on metadata/
    with pytest.raises(exceptions.Forbidden):
        kv.read_secret_metadata("apps/one", mount_point=vault_mount)
    with pytest.raises(exceptions.Forbidden):
        client.sys.list_mounted_secrets_engines()
    assert client.lookup_token()["data"]["policies"][0] == "default"  # default policy: lookup-self


def test_create_versus_update_capability(root, vault, vault_mount) -> None:  # type: ignore[no-untyped-def]
    root.secrets.kv.v2.create_or_update_secret("cu/existing", {"v": "1"}, mount_point=vault_mount)
    client, _ = limited_client(vault, root, f'''
        path "{vault_mount}/data/cu/*" {{ capabilities = ["create"] }}
        path "{vault_mount}/metadata/cu/*" {{ capabilities = ["list"] }}
        path "{vault_mount}/metadata/cu" {{ capabilities = ["list"] }}
    ''')
    kv = client.secrets.kv.v2
    assert kv.create_or_update_secret("cu/new", {"v": "1"}, mount_point=vault_mount)["data"]["version"] == 1
    with pytest.raises(exceptions.Forbidden):
        kv.create_or_update_secret("cu/existing", {"v": "2"}, mount_point=vault_mount)
    assert sorted(kv.list_secrets("cu", mount_point=vault_mount)["data"]["keys"]) == ["existing", "new"]


def test_capabilities_self(root, vault, vault_mount) -> None:  # type: ignore[no-untyped-def]
    client, _ = limited_client(vault, root, f'path "{vault_mount}/data/+/cfg" {{ capabilities = ["read", "list"] }}')
    caps = client.sys.get_capabilities([f"{vault_mount}/data/team/cfg", f"{vault_mount}/data/x"])
    assert caps[f"{vault_mount}/data/team/cfg"] == ["list", "read"]
    assert caps[f"{vault_mount}/data/x"] == ["deny"]


# --------------------------------------------------------------------------- tokens
def test_token_create_lookup_renew_revoke(root, vault) -> None:  # type: ignore[no-untyped-def]
    policy = _name("tok")
    root.sys.create_or_update_acl_policy(policy, 'path "secret/data/x" { capabilities = ["read"] }')
    auth = root.auth.token.create(policies=[policy], ttl="10m", renewable=True)["auth"]
    assert auth["lease_duration"] == 600 and auth["renewable"] is True
    assert auth["policies"] == sorted(["default", policy])
    client = hvac.Client(url=vault.addr, token=auth["client_token"])
    info = client.auth.token.lookup_self()["data"]
    assert info["policies"] == sorted(["default", policy]) and 0 < info["ttl"] <= 600
    assert info["creation_ttl"] == 600 and info["renewable"] is True and info["orphan"] is False
    assert info["path"] == "auth/token/create" and info["expire_time"]
    renewed = client.auth.token.renew_self(increment="20m")["auth"]
    assert 600 < renewed["lease_duration"] <= 1200
    client.auth.token.revoke_self()
    with pytest.raises(exceptions.Forbidden) as denied:
        client.auth.token.lookup_self()
    assert "permission denied" in denied.value.errors[0]


def test_bad_token_and_missing_token_are_403(vault) -> None:  # type: ignore[no-untyped-def]
    bad = hvac.Client(url=vault.addr, token="hvs.not-a-token")
    with pytest.raises(exceptions.Forbidden) as info:
        bad.secrets.kv.v2.read_secret("x", mount_point="secret", raise_on_deleted_version=True)
    assert "permission denied" in info.value.errors[0]
    response = requests.get(f"{vault.addr}/v1/secret/data/x", timeout=5)
    assert response.status_code == 403 and "permission denied" in response.json()["errors"][0]


def test_child_token_rules(root, vault) -> None:  # type: ignore[no-untyped-def]
    parent_policy = _name("parent")
    root.sys.create_or_update_acl_policy(parent_policy, 'path "auth/token/create" { capabilities = ["update"] }')
    parent = hvac.Client(url=vault.addr, token=root.auth.token.create(policies=[parent_policy], ttl="1h")["auth"]["client_token"])
    with pytest.raises(exceptions.InvalidRequest):
        parent.auth.token.create(policies=["root"])  # not a subset of the parent's
    with pytest.raises(exceptions.InvalidRequest):
        parent.auth.token.create(no_parent=True)  # orphans need root or sudo
    child = parent.auth.token.create(ttl="5m")["auth"]
    assert child["orphan"] is False and parent_policy in child["policies"]
    parent.auth.token.revoke_self()  # revokes the child too
    with pytest.raises(exceptions.Forbidden):
        hvac.Client(url=vault.addr, token=child["client_token"]).auth.token.lookup_self()
    orphan = root.auth.token.create(policies=["default"], no_parent=True, ttl="5m")["auth"]
    assert orphan["orphan"] is True


def test_num_uses(root, vault) -> None:  # type: ignore[no-untyped-def]
    token = root.auth.token.create(policies=["default"], num_uses=2, ttl="1h")["auth"]["client_token"]
    client = hvac.Client(url=vault.addr, token=token)
    assert client.auth.token.lookup_self()["data"]["num_uses"] == 1  # this request was the first use
    client.auth.token.lookup_self()
    with pytest.raises(exceptions.Forbidden):
        client.auth.token.lookup_self()


def test_token_expires_after_ttl_with_injected_time(root, vault) -> None:  # type: ignore[no-untyped-def]
    if vault.real:
        pytest.skip("needs the stand-in's injectable clock")
    start = datetime.now(timezone.utc)
    set_clock(lambda: start)
    token = root.auth.token.create(policies=["default"], ttl="30s", renewable=False)["auth"]["client_token"]
    client = hvac.Client(url=vault.addr, token=token)
    assert client.auth.token.lookup_self()["data"]["ttl"] == 30
    with pytest.raises(exceptions.InvalidRequest):
        client.auth.token.renew_self()  # not renewable
    set_clock(lambda: start + timedelta(seconds=31))
    with pytest.raises(exceptions.Forbidden):
        client.auth.token.lookup_self()
