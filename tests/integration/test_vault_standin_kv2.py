"""KV v2 through hvac over HTTP, against the stand-in (or a real Vault when VAULT_ADDR is set).

Assertions are on behaviour real Vault has: status codes, error strings, the 404-with-envelope
answer for deleted versions, trimming, check-and-set. Stand-in-only checks (injected time) skip
on a real Vault.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import hvac
import pytest
import requests
from hvac import exceptions

from worker.clock import set_clock

pytestmark = pytest.mark.integration


@pytest.fixture
def client(vault):  # type: ignore[no-untyped-def]
    c = hvac.Client(url=vault.addr, token=vault.token)
    yield c
    c.adapter.close()


def raw(vault, method: str, path: str, headers: dict[str, str] | None = None, **kwargs):  # type: ignore[no-untyped-def]
    headers = {"X-Vault-Token": vault.token, **(headers or {})}
    return requests.request(method, f"{vault.addr}/v1/{path}", headers=headers, timeout=5, **kwargs)


def test_write_read_versions_and_envelope(client, vault, vault_mount) -> None:  # type: ignore[no-untyped-def]
    kv = client.secrets.kv.v2
    first = kv.create_or_update_secret("app/db", {"password": "one"}, mount_point=vault_mount)
    assert first["data"]["version"] == 1 and first["data"]["deletion_time"] == "" and first["data"]["destroyed"] is False
    kv.create_or_update_secret("app/db", {"password": "two"}, mount_point=vault_mount)
    latest = kv.read_secret_version("app/db", mount_point=vault_mount, raise_on_deleted_version=True)
    assert latest["data"]["data"] == {"password": "two"}
    assert latest["data"]["metadata"]["version"] == 2
    assert set(latest) >= {"request_id", "lease_id", "renewable", "lease_duration", "data", "wrap_info", "warnings", "auth"}
    old = kv.read_secret_version("app/db", version=1, mount_point=vault_mount, raise_on_deleted_version=True)
    assert old["data"]["data"] == {"password": "one"}
    with pytest.raises(exceptions.InvalidPath):
        kv.read_secret_version("app/db", version=3, mount_point=vault_mount, raise_on_deleted_version=True)
    response = raw(vault, "GET", f"{vault_mount}/data/app/missing")
    assert response.status_code == 404 and response.json() == {"errors": []}
    assert response.headers["Content-Type"] == "application/json"


def test_check_and_set(client, vault_mount) -> None:  # type: ignore[no-untyped-def]
    kv = client.secrets.kv.v2
    kv.create_or_update_secret("k", {"v": "1"}, cas=0, mount_point=vault_mount)
    with pytest.raises(exceptions.InvalidRequest) as info:
        kv.create_or_update_secret("k", {"v": "x"}, cas=0, mount_point=vault_mount)
    assert info.value.errors == ["check-and-set parameter did not match the current version"]
    with pytest.raises(exceptions.InvalidRequest):
        kv.create_or_update_secret("k", {"v": "x"}, cas=5, mount_point=vault_mount)
    assert kv.create_or_update_secret("k", {"v": "2"}, cas=1, mount_point=vault_mount)["data"]["version"] == 2


def test_cas_required_at_key_and_mount_level(client, vault_mount) -> None:  # type: ignore[no-untyped-def]
    kv = client.secrets.kv.v2
    kv.create_or_update_secret("strict", {"v": "1"}, mount_point=vault_mount)
    kv.update_metadata("strict", cas_required=True, mount_point=vault_mount)
    with pytest.raises(exceptions.InvalidRequest) as info:
        kv.create_or_update_secret("strict", {"v": "2"}, mount_point=vault_mount)
    assert info.value.errors == ["check-and-set parameter required for this call"]
    kv.create_or_update_secret("relaxed", {"v": "1"}, mount_point=vault_mount)  # other keys unaffected
    kv.configure(cas_required=True, mount_point=vault_mount)
    with pytest.raises(exceptions.InvalidRequest):
        kv.create_or_update_secret("relaxed", {"v": "2"}, mount_point=vault_mount)
    assert kv.create_or_update_secret("relaxed", {"v": "2"}, cas=1, mount_point=vault_mount)["data"]["version"] == 2
    config = kv.read_configuration(mount_point=vault_mount)["data"]
    assert config["cas_required"] is True and config["max_versions"] == 10 and config["delete_version_after"] == "0s"


def test_empty_data_is_rejected(vault, vault_mount) -> None:  # type: ignore[no-untyped-def]
    response = raw(vault, "POST", f"{vault_mount}/data/x", json={"options": {}})
    assert response.status_code == 400
    assert response.json() == {"errors": ["no data provided"]}


def test_soft_delete_undelete_destroy(client, vault, vault_mount) -> None:  # type: ignore[no-untyped-def]
    kv = client.secrets.kv.v2
    for n in (1, 2, 3):
        kv.create_or_update_secret("s", {"n": str(n)}, mount_point=vault_mount)
    kv.delete_latest_version_of_secret("s", mount_point=vault_mount)
    response = raw(vault, "GET", f"{vault_mount}/data/s")
    assert response.status_code == 404
    body = response.json()
    assert body["data"]["data"] is None
    assert body["data"]["metadata"]["version"] == 3 and body["data"]["metadata"]["deletion_time"] != ""
    assert "errors" not in body
    with pytest.raises(exceptions.InvalidPath):
        kv.read_secret("s", mount_point=vault_mount, raise_on_deleted_version=True)
    soft = kv.read_secret("s", mount_point=vault_mount, raise_on_deleted_version=False)
    assert soft["data"]["data"] is None

    kv.undelete_secret_versions("s", [3], mount_point=vault_mount)
    assert kv.read_secret("s", mount_point=vault_mount, raise_on_deleted_version=True)["data"]["data"] == {"n": "3"}

    kv.delete_secret_versions("s", [1, 2, 99], mount_point=vault_mount)
    kv.destroy_secret_versions("s", [2], mount_point=vault_mount)
    versions = kv.read_secret_metadata("s", mount_point=vault_mount)["data"]["versions"]
    assert versions["1"]["deletion_time"] != "" and versions["1"]["destroyed"] is False
    assert versions["2"]["destroyed"] is True
    assert versions["3"]["deletion_time"] == ""
    kv.undelete_secret_versions("s", [1, 2], mount_point=vault_mount)
    assert kv.read_secret_version("s", version=1, mount_point=vault_mount, raise_on_deleted_version=True)["data"]["data"] == {"n": "1"}
    destroyed = raw(vault, "GET", f"{vault_mount}/data/s", params={"version": 2})
    assert destroyed.status_code == 404
    assert destroyed.json()["data"]["data"] is None and destroyed.json()["data"]["metadata"]["destroyed"] is True

    missing = raw(vault, "POST", f"{vault_mount}/delete/s", json={})
    assert missing.status_code == 400 and missing.json() == {"errors": ["no version number provided"]}


def test_max_versions_trimming_mount_then_key(client, vault, vault_mount) -> None:  # type: ignore[no-untyped-def]
    kv = client.secrets.kv.v2
    kv.configure(max_versions=2, mount_point=vault_mount)
    for n in range(1, 5):
        kv.create_or_update_secret("t", {"n": str(n)}, mount_point=vault_mount)
    meta = kv.read_secret_metadata("t", mount_point=vault_mount)["data"]
    assert sorted(meta["versions"]) == ["3", "4"]
    assert meta["current_version"] == 4 and meta["oldest_version"] == 3 and meta["max_versions"] == 0
    assert raw(vault, "GET", f"{vault_mount}/data/t", params={"version": 1}).json() == {"errors": []}

    kv.update_metadata("t", max_versions=3, mount_point=vault_mount)
    for n in range(5, 8):
        kv.create_or_update_secret("t", {"n": str(n)}, mount_point=vault_mount)
    meta = kv.read_secret_metadata("t", mount_point=vault_mount)["data"]
    assert sorted(meta["versions"], key=int) == ["5", "6", "7"] and meta["max_versions"] == 3


def test_default_max_versions_is_ten(client, vault_mount) -> None:  # type: ignore[no-untyped-def]
    kv = client.secrets.kv.v2
    for n in range(1, 13):
        kv.create_or_update_secret("d", {"n": str(n)}, mount_point=vault_mount)
    meta = kv.read_secret_metadata("d", mount_point=vault_mount)["data"]
    assert len(meta["versions"]) == 10 and min(map(int, meta["versions"])) == 3


def test_metadata_custom_metadata_and_delete(client, vault_mount) -> None:  # type: ignore[no-untyped-def]
    kv = client.secrets.kv.v2
    kv.create_or_update_secret("m", {"a": "b"}, mount_point=vault_mount)
    meta = kv.read_secret_metadata("m", mount_point=vault_mount)["data"]
    assert meta["custom_metadata"] is None and meta["delete_version_after"] == "0s" and meta["oldest_version"] == 0
    kv.update_metadata("m", custom_metadata={"owner": "team-a"}, delete_version_after="1h", mount_point=vault_mount)
    meta = kv.read_secret_metadata("m", mount_point=vault_mount)["data"]
    assert meta["custom_metadata"] == {"owner": "team-a"} and meta["delete_version_after"] == "1h0m0s"
    written = kv.create_or_update_secret("m", {"a": "c"}, mount_point=vault_mount)["data"]
    assert written["custom_metadata"] == {"owner": "team-a"} and written["deletion_time"] != ""
    kv.delete_metadata_and_all_versions("m", mount_point=vault_mount)
    with pytest.raises(exceptions.InvalidPath):
        kv.read_secret_metadata("m", mount_point=vault_mount)
    # metadata written before any data creates the key without versions
    kv.update_metadata("pre", max_versions=4, mount_point=vault_mount)
    assert kv.read_secret_metadata("pre", mount_point=vault_mount)["data"]["current_version"] == 0
    with pytest.raises(exceptions.InvalidPath):
        kv.read_secret("pre", mount_point=vault_mount, raise_on_deleted_version=True)


def test_list_with_list_verb_and_get_query(client, vault, vault_mount) -> None:  # type: ignore[no-untyped-def]
    kv = client.secrets.kv.v2
    with pytest.raises(exceptions.InvalidPath):
        kv.list_secrets("", mount_point=vault_mount)
    for path in ("apps/a", "apps/b/c", "apps/b/d", "other"):
        kv.create_or_update_secret(path, {"x": "1"}, mount_point=vault_mount)
    assert kv.list_secrets("apps", mount_point=vault_mount)["data"]["keys"] == ["a", "b/"]
    assert kv.list_secrets("", mount_point=vault_mount)["data"]["keys"] == ["apps/", "other"]
    via_get = raw(vault, "GET", f"{vault_mount}/metadata/apps/b", params={"list": "true"})
    assert via_get.status_code == 200 and via_get.json()["data"]["keys"] == ["c", "d"]
    assert raw(vault, "LIST", f"{vault_mount}/metadata/nothing").status_code == 404


def test_patch_via_hvac_and_merge_patch(client, vault, vault_mount) -> None:  # type: ignore[no-untyped-def]
    kv = client.secrets.kv.v2
    kv.create_or_update_secret("p", {"a": "1", "b": "2"}, mount_point=vault_mount)
    with pytest.warns(DeprecationWarning):
        assert kv.patch("p", {"b": "3", "c": "4"}, mount_point=vault_mount)["data"]["version"] == 2
    assert kv.read_secret("p", mount_point=vault_mount, raise_on_deleted_version=True)["data"]["data"] == {"a": "1", "b": "3", "c": "4"}
    response = raw(vault, "PATCH", f"{vault_mount}/data/p", json={"data": {"a": None}},
                   headers={"Content-Type": "application/merge-patch+json"})
    assert response.status_code == 200 and response.json()["data"]["version"] == 3
    assert kv.read_secret("p", mount_point=vault_mount, raise_on_deleted_version=True)["data"]["data"] == {"b": "3", "c": "4"}
    wrong_type = raw(vault, "PATCH", f"{vault_mount}/data/p", json={"data": {"a": "1"}})
    assert wrong_type.status_code == 415
    with pytest.raises(exceptions.InvalidPath), pytest.warns(DeprecationWarning):
        kv.patch("absent", {"x": "1"}, mount_point=vault_mount)  # hvac's patch reads without raise_on_deleted_version


def test_subkeys(vault, client, vault_mount) -> None:  # type: ignore[no-untyped-def]
    client.secrets.kv.v2.create_or_update_secret("sk", {"a": "1", "nested": {"x": "y"}}, mount_point=vault_mount)
    response = raw(vault, "GET", f"{vault_mount}/subkeys/sk")
    assert response.status_code == 200
    assert response.json()["data"]["subkeys"] == {"a": None, "nested": {"x": None}}
    assert response.json()["data"]["metadata"]["version"] == 1


def test_delete_version_after_with_injected_time(client, vault, vault_mount) -> None:  # type: ignore[no-untyped-def]
    if vault.real:
        pytest.skip("needs the stand-in's injectable clock")
    kv = client.secrets.kv.v2
    start = datetime.now(timezone.utc)
    set_clock(lambda: start)
    kv.configure(delete_version_after="30m0s", mount_point=vault_mount)
    kv.create_or_update_secret("ttl", {"v": "1"}, mount_point=vault_mount)
    assert kv.read_secret("ttl", mount_point=vault_mount, raise_on_deleted_version=True)["data"]["data"] == {"v": "1"}
    set_clock(lambda: start + timedelta(minutes=31))
    with pytest.raises(exceptions.InvalidPath):
        kv.read_secret("ttl", mount_point=vault_mount, raise_on_deleted_version=True)


def test_unknown_kv_path_and_wrong_method(vault, vault_mount) -> None:  # type: ignore[no-untyped-def]
    assert raw(vault, "GET", f"{vault_mount}/bogus/x").status_code == 404
    assert raw(vault, "DELETE", f"{vault_mount}/subkeys/x").status_code == 405
    assert raw(vault, "GET", f"nomount-{uuid.uuid4().hex[:6]}/x").status_code in (403, 404)


def test_concurrent_check_and_set_writers_never_lose_an_update(vault, vault_mount) -> None:  # type: ignore[no-untyped-def]
    """Several clients race on one key with read-then-cas-write; every success is a distinct version."""
    import threading

    wins: list[int] = []
    lock = threading.Lock()

    def writer(worker: int) -> None:
        client = hvac.Client(url=vault.addr, token=vault.token)
        kv = client.secrets.kv.v2
        done = 0
        for _ in range(200):  # bounded: retries on a lost race
            if done == 5:
                break
            try:
                current = kv.read_secret_metadata("race", mount_point=vault_mount)["data"]["current_version"]
            except exceptions.InvalidPath:
                current = 0
            try:
                version = kv.create_or_update_secret("race", {"w": str(worker)}, cas=current, mount_point=vault_mount)["data"]["version"]
            except exceptions.InvalidRequest:
                continue
            with lock:
                wins.append(version)
            done += 1
        client.adapter.close()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(wins) == list(range(1, 31))
