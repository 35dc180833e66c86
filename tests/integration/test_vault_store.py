"""VaultStore against a real OpenBao server (or the Vault VAULT_ADDR/VAULT_TOKEN name).

Only behaviour real Vault has is relied on. Faults (503, 429) are injected by a small HTTP proxy
in front of Vault, so hvac, requests and the store's retry loop run unchanged.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import hvac
import pytest
import requests

from tests.k8s_tokenreview import TokenReviewer, new_signing_key, service_account_jwt, start_token_reviewer
from worker.clock import set_clock
from worker.secret import Secret
from worker.settings import load_settings
from worker.vault import (
    KEY_ID_FIELD,
    VaultCheckAndSetMismatch,
    VaultNotFound,
    VaultPermissionDenied,
    VaultStore,
    VaultUnavailable,
)

pytestmark = pytest.mark.integration


# ------------------------------------------------------------------ fault-injecting proxy
@dataclass
class Fault:
    path_contains: str
    status: int
    times: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b'{"errors":["injected"]}'


class FaultProxy:
    """Forwards every request to Vault, except that queued faults answer first (then run out)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.faults: list[Fault] = []
        self.seen: list[tuple[str, str, int]] = []  # (method, path, status answered)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = proxy._take(self.path)
                if fault is not None:
                    self._answer(fault.status, fault.body, {"Content-Type": "application/json", **fault.headers})
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in {"host", "content-length"}}
                upstream = requests.request(self.command, proxy.upstream + self.path, headers=headers, data=body,
                                            timeout=10)
                keep = {k: v for k, v in upstream.headers.items()
                        if k.lower() not in {"content-length", "transfer-encoding", "connection", "content-encoding"}}
                self._answer(upstream.status_code, upstream.content, keep)

            def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                with proxy._lock:
                    proxy.seen.append((self.command, self.path.split("?")[0], status))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_LIST = do_PATCH = _serve

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def _take(self, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.path_contains in path and fault.times > 0:
                    fault.times -= 1
                    return fault
        return None

    def count(self, method: str, path_contains: str) -> int:
        with self._lock:
            return sum(1 for m, p, _ in self.seen if m == method and path_contains in p)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ------------------------------------------------------------------ fixtures
@pytest.fixture
def root(vault) -> Iterator[hvac.Client]:  # type: ignore[no-untyped-def]
    client = hvac.Client(url=vault.addr, token=vault.token)
    yield client
    client.adapter.close()


@pytest.fixture
def proxy(vault) -> Iterator[FaultProxy]:  # type: ignore[no-untyped-def]
    p = FaultProxy(vault.addr)
    yield p
    p.stop()


def make_store(addr: str, mount: str, *, token: str | None = None, sleeps: list[float] | None = None,
               **settings: Any) -> VaultStore:
    env: dict[str, Any] = {"VAULT_ADDR": addr, "vault_mount": mount, "vault_staging_prefix": "keyrotor/staging",
                           "vault_timeout_s": 5.0, **settings}
    if token:
        env["VAULT_TOKEN"] = token
    recorded = sleeps if sleeps is not None else []
    return VaultStore.from_settings(load_settings(**env), sleep=recorded.append)


@pytest.fixture
def store(vault, vault_mount) -> VaultStore:  # type: ignore[no-untyped-def]
    return make_store(vault.addr, vault_mount, token=vault.token)


def path() -> str:
    return f"apps/{uuid.uuid4().hex[:8]}/stripe"


# ------------------------------------------------------------------ promote / read
def test_promote_new_path_then_cas_chain(store: VaultStore, vault_mount: str) -> None:
    p = path()
    assert store.read_current(vault_mount, p, "api_key") is None
    v1 = store.promote(vault_mount, p, "api_key", Secret("first-key-value"), "key_1", None)
    assert v1 == 1
    current = store.read_current(vault_mount, p, "api_key")
    assert current is not None and current.version == 1
    assert current.secret == Secret("first-key-value") and current.provider_key_id == "key_1"

    v2 = store.promote(vault_mount, p, "api_key", Secret("second-key-value"), "key_2", expected_version=1)
    assert v2 == 2
    assert store.read_current(vault_mount, p, "api_key").secret == Secret("second-key-value")  # type: ignore[union-attr]
    previous = store.read_version(vault_mount, p, "api_key", 1)
    assert previous.secret == Secret("first-key-value") and previous.provider_key_id == "key_1"


def test_promote_cas_mismatch(store: VaultStore, vault_mount: str) -> None:
    p = path()
    store.promote(vault_mount, p, "api_key", Secret("one-value"), "k1", None)
    store.promote(vault_mount, p, "api_key", Secret("two-value"), "k2", 1)
    with pytest.raises(VaultCheckAndSetMismatch) as info:
        store.promote(vault_mount, p, "api_key", Secret("three-value"), "k3", expected_version=1)
    assert p in str(info.value) and "three-value" not in str(info.value)
    with pytest.raises(VaultCheckAndSetMismatch):  # None means "must not exist"
        store.promote(vault_mount, p, "api_key", Secret("three-value"), "k3", expected_version=None)
    assert store.read_current(vault_mount, p, "api_key").version == 2  # type: ignore[union-attr]


def test_promote_rerun_is_idempotent_and_keeps_other_fields(store: VaultStore, vault_mount: str) -> None:
    p = path()
    assert store.write(vault_mount, p, {"api_key": "old-value", "username": "svc-billing"}) == 1
    assert store.promote(vault_mount, p, "api_key", Secret("new-value"), "k9", expected_version=1) == 2
    # The same step delivered twice: the second CAS fails, but the effect is already there.
    assert store.promote(vault_mount, p, "api_key", Secret("new-value"), "k9", expected_version=1) == 2
    raw = store.client.secrets.kv.v2.read_secret_version(path=p, mount_point=vault_mount, raise_on_deleted_version=True)
    assert raw["data"]["data"] == {"api_key": "new-value", "username": "svc-billing", KEY_ID_FIELD: "k9"}
    assert [v.version for v in store.list_versions(vault_mount, p)] == [1, 2]


def test_inside_a_chain_a_version_read_once_is_not_read_again_but_what_is_served_always_is(
        store: VaultStore, vault_mount: str, root: hvac.Client) -> None:
    from worker.vault.store import remembering_versions

    p = path()
    assert store.write(vault_mount, p, {"api_key": "old-value", "username": "svc-billing"}) == 1
    with remembering_versions():
        before = store.requests
        served = store.read_current(vault_mount, p, "api_key")  # issue: what Vault serves
        assert served is not None and served.version == 1
        # promote carries over the fields of the version issue read: no read, only the write
        assert store.promote(vault_mount, p, "api_key", Secret("new-value"), "k9", expected_version=1) == 2
        assert store.requests - before == 2
        # retire: what is served now is asked again; the old version issue read is not
        assert store.read_current(vault_mount, p, "api_key").version == 2  # type: ignore[union-attr]
        assert store.read_version(vault_mount, p, "api_key", 1).secret == Secret("old-value")
        assert store.requests - before == 3
        # a change made behind the chain's back is seen by the next read of what is served
        root.secrets.kv.v2.create_or_update_secret(path=p, secret={"api_key": "by-hand"}, mount_point=vault_mount)
        assert store.read_current(vault_mount, p, "api_key").secret == Secret("by-hand")  # type: ignore[union-attr]
    raw = root.secrets.kv.v2.read_secret_version(path=p, version=2, mount_point=vault_mount, raise_on_deleted_version=True)
    assert raw["data"]["data"] == {"api_key": "new-value", "username": "svc-billing", KEY_ID_FIELD: "k9"}
    # Outside a chain every read goes to Vault.
    before = store.requests
    store.read_version(vault_mount, p, "api_key", 1)
    store.read_version(vault_mount, p, "api_key", 1)
    assert store.requests - before == 2


def test_restore_previous_version(store: VaultStore, vault_mount: str) -> None:
    p = path()
    store.promote(vault_mount, p, "api_key", Secret("old-value"), "k_old", None)
    store.promote(vault_mount, p, "api_key", Secret("new-value"), "k_new", 1)
    with pytest.raises(VaultCheckAndSetMismatch):
        store.restore(vault_mount, p, from_version=1, expected_version=1)
    assert store.restore(vault_mount, p, from_version=1, expected_version=2) == 3
    current = store.read_current(vault_mount, p, "api_key")
    assert current is not None and current.version == 3
    assert current.secret == Secret("old-value") and current.provider_key_id == "k_old"
    assert store.restore(vault_mount, p, from_version=1, expected_version=2) == 3  # re-run: already done
    versions = store.list_versions(vault_mount, p)
    assert [(v.version, v.current, v.readable) for v in versions] == [(1, False, True), (2, False, True), (3, True, True)]
    assert all(v.created_at is not None and v.created_at.tzinfo is not None for v in versions)


def test_deleted_version_and_missing_field(store: VaultStore, root: hvac.Client, vault_mount: str) -> None:
    p = path()
    store.write(vault_mount, p, {"api_key": "v1-value"})
    store.write(vault_mount, p, {"api_key": "v2-value"})
    root.secrets.kv.v2.delete_secret_versions(path=p, versions=[1], mount_point=vault_mount)
    with pytest.raises(VaultNotFound, match="deleted"):
        store.read_version(vault_mount, p, "api_key", 1)
    with pytest.raises(VaultNotFound, match="deleted"):
        store.restore(vault_mount, p, from_version=1, expected_version=2)
    versions = store.list_versions(vault_mount, p)
    assert versions[0].deleted_at is not None and not versions[0].readable
    with pytest.raises(VaultNotFound, match="does not exist"):
        store.read_version(vault_mount, p, "api_key", 7)
    with pytest.raises(VaultNotFound, match="fields present: api_key"):
        store.read_field(vault_mount, p, "password")
    assert store.read_field(vault_mount, p, "api_key") == Secret("v2-value")
    with pytest.raises(VaultNotFound):
        store.read_field(vault_mount, path(), "api_key")


# ------------------------------------------------------------------ staging
def test_stage_read_discard(store: VaultStore, root: hvac.Client, vault_mount: str) -> None:
    run_id = uuid.uuid4().hex
    store.stage_pending(run_id, Secret("staged-value-1"), "key_staged")
    store.stage_pending(run_id, Secret("staged-value-2"), None)  # a re-issue overwrites
    assert store.read_pending(run_id) == (Secret("staged-value-2"), None)
    staged = root.secrets.kv.v2.read_secret_metadata(path=f"keyrotor/staging/{run_id}", mount_point=vault_mount)
    assert staged["data"]["current_version"] == 2
    store.discard_pending(run_id)
    with pytest.raises(VaultNotFound, match=run_id):
        store.read_pending(run_id)
    store.discard_pending(run_id)  # idempotent
    assert store.list_versions(vault_mount, f"keyrotor/staging/{run_id}") == []  # every version destroyed



def test_staged_key_keeps_its_provider_expiry(store: VaultStore) -> None:
    """A step that recovers a staged key after a crash must still know when it expires."""
    from datetime import datetime, timezone

    run_id = uuid.uuid4().hex
    expires = datetime(2027, 1, 31, 12, 0, tzinfo=timezone.utc)
    store.stage_pending(run_id, Secret("staged-value"), "key_1", expires)
    assert store.pending_expiry(run_id) == expires
    store.stage_pending(run_id, Secret("staged-value-b"), "key_2")  # no expiry given
    assert store.pending_expiry(run_id) is None
    store.discard_pending(run_id)
    assert store.pending_expiry(run_id) is None

# ------------------------------------------------------------------ metadata
def test_custom_metadata_round_trip_keeps_delete_version_after(store: VaultStore, root: hvac.Client,
                                                                vault_mount: str) -> None:
    p = path()
    assert store.custom_metadata(vault_mount, p) == {}
    store.write(vault_mount, p, {"api_key": "value-1"})
    root.secrets.kv.v2.update_metadata(path=p, mount_point=vault_mount, delete_version_after="1h", max_versions=7)
    store.set_custom_metadata(vault_mount, p, {"keyrotor_run": "r1", "owner": "billing"})
    store.set_custom_metadata(vault_mount, p, {"keyrotor_run": "r2"})
    assert store.custom_metadata(vault_mount, p) == {"keyrotor_run": "r2", "owner": "billing"}
    meta = root.secrets.kv.v2.read_secret_metadata(path=p, mount_point=vault_mount)["data"]
    assert meta["delete_version_after"] == "1h0m0s"  # hvac's "0s" default was not sent
    assert meta["max_versions"] == 7


# ------------------------------------------------------------------ permissions
def test_limited_policy_token_gets_permission_denied(vault, root: hvac.Client, vault_mount: str,  # type: ignore[no-untyped-def]
                                                     proxy: FaultProxy) -> None:
    p = path()
    root.secrets.kv.v2.create_or_update_secret(path=p, secret={"api_key": "readable"}, mount_point=vault_mount)
    policy = f'path "{vault_mount}/data/apps/*" {{ capabilities = ["read"] }}'
    name = f"kr-read-{uuid.uuid4().hex[:6]}"
    root.sys.create_or_update_acl_policy(name=name, policy=policy)
    token = root.auth.token.create(policies=[name], ttl="10m")["auth"]["client_token"]
    limited = make_store(proxy.url, vault_mount, token=token)
    assert limited.read_field(vault_mount, p, "api_key") == Secret("readable")
    with pytest.raises(VaultPermissionDenied) as info:
        limited.promote(vault_mount, p, "api_key", Secret("not-allowed-value"), "k", expected_version=1)
    message = str(info.value)
    assert f"{vault_mount}/data/{p}" in message and "'create' and 'update'" in message
    assert "vault-policy.hcl" in message and "not-allowed-value" not in message
    assert proxy.count("POST", f"/v1/{vault_mount}/data/{p}") == 1  # 403: no retry
    root.sys.delete_acl_policy(name)


# ------------------------------------------------------------------ retries
def test_retries_on_503_then_succeeds(vault, vault_mount: str, proxy: FaultProxy) -> None:  # type: ignore[no-untyped-def]
    sleeps: list[float] = []
    s = make_store(proxy.url, vault_mount, token=vault.token, sleeps=sleeps)
    p = path()
    s.write(vault_mount, p, {"api_key": "value-a"})
    proxy.faults.append(Fault(f"/{vault_mount}/data/{p}", 503, times=2))
    assert s.read_field(vault_mount, p, "api_key") == Secret("value-a")
    assert proxy.count("GET", f"/v1/{vault_mount}/data/{p}") == 3
    assert len(sleeps) == 2 and all(0 <= d <= 3.0 for d in sleeps)


def test_gives_up_after_bounded_attempts(vault, vault_mount: str, proxy: FaultProxy) -> None:  # type: ignore[no-untyped-def]
    sleeps: list[float] = []
    s = make_store(proxy.url, vault_mount, token=vault.token, sleeps=sleeps)
    p = path()
    proxy.faults.append(Fault(f"/{vault_mount}/data/{p}", 502, times=100))
    with pytest.raises(VaultUnavailable, match="502"):
        s.write(vault_mount, p, {"api_key": "never-written"})
    assert proxy.count("POST", f"/v1/{vault_mount}/data/{p}") == 4 and len(sleeps) == 3


def test_no_retry_on_4xx(vault, vault_mount: str, proxy: FaultProxy) -> None:  # type: ignore[no-untyped-def]
    sleeps: list[float] = []
    s = make_store(proxy.url, vault_mount, token=vault.token, sleeps=sleeps)
    p = path()
    s.write(vault_mount, p, {"api_key": "v1-value"})
    with pytest.raises(VaultCheckAndSetMismatch):
        s.write(vault_mount, p, {"api_key": "v2-value"}, cas=0)
    assert proxy.count("POST", f"/v1/{vault_mount}/data/{p}") == 2 and sleeps == []


def test_rate_limit_retry_after(vault, vault_mount: str, proxy: FaultProxy) -> None:  # type: ignore[no-untyped-def]
    sleeps: list[float] = []
    s = make_store(proxy.url, vault_mount, token=vault.token, sleeps=sleeps)
    p = path()
    s.write(vault_mount, p, {"api_key": "v1-value"})
    proxy.faults.append(Fault(f"/{vault_mount}/data/{p}", 429, times=1, headers={"Retry-After": "2"}))
    assert s.read_field(vault_mount, p, "api_key") == Secret("v1-value")
    assert sleeps and sleeps[0] >= 2.0
    # Longer than the store's max delay: re-raised at once so the step can reschedule.
    sleeps.clear()
    proxy.faults.append(Fault(f"/{vault_mount}/data/{p}", 429, times=1, headers={"Retry-After": "120"}))
    with pytest.raises(VaultUnavailable) as info:
        s.read_field(vault_mount, p, "api_key")
    assert info.value.retry_after == 120.0 and sleeps == []


def test_promote_retried_write_that_landed_is_not_a_conflict(vault, vault_mount: str,  # type: ignore[no-untyped-def]
                                                            proxy: FaultProxy, root: hvac.Client) -> None:
    """A write whose answer was lost (e.g. 502 from a proxy after Vault applied it) is retried;
    the retry's CAS fails, and promote recognises its own write."""
    s = make_store(proxy.url, vault_mount, token=vault.token)
    p = path()
    s.promote(vault_mount, p, "api_key", Secret("old-value"), "k1", None)
    # Simulate "applied but answer lost": write directly, then let the store's first POST fail.
    root.secrets.kv.v2.create_or_update_secret(path=p, secret={"api_key": "new-value", KEY_ID_FIELD: "k2"},
                                               cas=1, mount_point=vault_mount)
    assert s.promote(vault_mount, p, "api_key", Secret("new-value"), "k2", expected_version=1) == 2


def test_calls_per_promote(vault, vault_mount: str, proxy: FaultProxy) -> None:  # type: ignore[no-untyped-def]
    s = make_store(proxy.url, vault_mount, token=vault.token)
    p = path()
    s.promote(vault_mount, p, "api_key", Secret("old-value"), "k1", None)  # first call also looks the token up
    before = len(proxy.seen)
    s.promote(vault_mount, p, "api_key", Secret("new-value"), "k2", 1)
    assert len(proxy.seen) - before == 2  # read the expected version (to keep other fields) + CAS write


def test_health(store: VaultStore, vault, vault_mount: str, proxy: FaultProxy) -> None:  # type: ignore[no-untyped-def]
    h = store.health()
    assert h.ok and h.reachable and not h.sealed and h.token_valid is True
    sealed_body = b'{"initialized":true,"sealed":true,"standby":true,"version":"1.15.0"}'
    proxy.faults.append(Fault("/sys/health", 503, times=1, body=sealed_body))
    h = make_store(proxy.url, vault_mount, token=vault.token).health()
    assert h.reachable and h.sealed and not h.ok
    bad = make_store(vault.addr, vault_mount, token="not-a-real-token").health()
    assert bad.token_valid is False and not bad.ok
    down = make_store("http://127.0.0.1:9", vault_mount, token="t").health()
    assert not down.reachable and not down.ok and "cannot connect" in down.detail


# ------------------------------------------------------------------ Kubernetes auth
@dataclass
class K8sSetup:
    role: str
    mount: str
    jwt_path: Path
    policy: str
    reviewer: TokenReviewer


@pytest.fixture
def k8s(vault, root: hvac.Client, vault_mount: str, tmp_path: Path) -> Iterator[K8sSetup]:  # type: ignore[no-untyped-def]
    """The real `kubernetes` auth method, asking a TokenReview stand-in about every JWT (as it asks
    the cluster's API server): JWTs signed by ``key`` are the cluster's service-account tokens."""
    key = new_signing_key()
    api = start_token_reviewer(key, tmp_path)
    mount = f"k8s-{uuid.uuid4().hex[:6]}"
    root.sys.enable_auth_method("kubernetes", path=mount)
    # No token_reviewer_jwt and no local CA JWT: the method reviews each login JWT with itself as bearer.
    root.write_data(f"auth/{mount}/config", data={"kubernetes_host": api.url, "kubernetes_ca_cert": api.ca_pem,
                                                   "disable_local_ca_jwt": True})
    policy = f"kr-k8s-{uuid.uuid4().hex[:6]}"
    root.sys.create_or_update_acl_policy(name=policy, policy=(
        f'path "{vault_mount}/data/*" {{ capabilities = ["create", "read", "update"] }}\n'
        f'path "{vault_mount}/metadata/*" {{ capabilities = ["read"] }}'))
    root.write_data(f"auth/{mount}/role/keyrotor", data={
        "bound_service_account_names": ["keyrotor"], "bound_service_account_namespaces": ["platform"],
        "policies": [policy], "ttl": "10m", "max_ttl": "1h"})
    jwt_path = tmp_path / "token"
    jwt_path.write_text(service_account_jwt(key, "platform", "keyrotor"))
    yield K8sSetup("keyrotor", mount, jwt_path, policy, api.reviewer)
    root.sys.disable_auth_method(mount)
    root.sys.delete_acl_policy(policy)
    api.stop()


def k8s_store(vault, vault_mount: str, k8s: K8sSetup, **kw: Any) -> VaultStore:  # type: ignore[no-untyped-def]
    return make_store(vault.addr, vault_mount, vault_k8s_role=k8s.role, vault_k8s_mount=k8s.mount,
                      vault_k8s_jwt_path=str(k8s.jwt_path), **kw)


def test_kubernetes_login_renewal_and_relogin(vault, root: hvac.Client, vault_mount: str,  # type: ignore[no-untyped-def]
                                              k8s: K8sSetup) -> None:
    store = k8s_store(vault, vault_mount, k8s)
    auth = store.auth
    p = path()
    store.write(vault_mount, p, {"api_key": "k8s-written"})
    assert (auth.logins, auth.renewals) == (1, 0)
    assert auth.lease is not None and 595 <= auth.lease.period_s <= 600 and auth.lease.renewable
    first_token = store.client.token
    lookup = root.auth.token.lookup(first_token)["data"]
    assert k8s.policy in lookup["policies"]

    start = datetime.now(timezone.utc)
    set_clock(lambda: start + timedelta(seconds=300))  # half the TTL left: no renewal yet
    store.read_field(vault_mount, p, "api_key")
    assert (auth.logins, auth.renewals) == (1, 0)
    set_clock(lambda: start + timedelta(seconds=450))  # under a third left: renew-self
    assert store.read_field(vault_mount, p, "api_key") == Secret("k8s-written")
    assert (auth.logins, auth.renewals) == (1, 1) and store.client.token == first_token

    # The token is revoked behind our back: the 403 leads to one re-login and a successful retry.
    root.auth.token.revoke(first_token)
    assert store.read_field(vault_mount, p, "api_key") == Secret("k8s-written")
    assert auth.logins == 2 and store.client.token != first_token

    # Past the token's expiry: log in again before the call rather than sending a dead token.
    set_clock(lambda: start + timedelta(seconds=450 + 700))
    assert store.read_field(vault_mount, p, "api_key") == Secret("k8s-written")
    assert auth.logins == 3
    # Every login was reviewed by the "cluster", and so was the renewal: the auth method asks again
    # whether the service account is still valid before it extends the token.
    assert k8s.reviewer.reviews == [True] * 4


def test_kubernetes_failed_renewal_falls_back_to_login(vault, root: hvac.Client, vault_mount: str,  # type: ignore[no-untyped-def]
                                                        k8s: K8sSetup, proxy: FaultProxy) -> None:
    store = make_store(proxy.url, vault_mount, vault_k8s_role=k8s.role, vault_k8s_mount=k8s.mount,
                       vault_k8s_jwt_path=str(k8s.jwt_path))
    p = path()
    store.write(vault_mount, p, {"api_key": "value-x"})
    start = datetime.now(timezone.utc)
    set_clock(lambda: start + timedelta(seconds=500))
    proxy.faults.append(Fault("/auth/token/renew-self", 400, times=1, body=b'{"errors":["lease is not renewable"]}'))
    assert store.read_field(vault_mount, p, "api_key") == Secret("value-x")
    assert (store.auth.logins, store.auth.renewals) == (2, 0)


def test_kubernetes_renewal_refused_by_the_cluster_logs_in_with_the_rotated_jwt(  # type: ignore[no-untyped-def]
        vault, vault_mount: str, k8s: K8sSetup) -> None:
    """The kubelet rotated the projected token and the cluster no longer accepts the old one: the
    real auth method refuses the renewal, and the store logs in again with the JWT now on disk."""
    store = k8s_store(vault, vault_mount, k8s)
    p = path()
    store.write(vault_mount, p, {"api_key": "value-r"})
    old_jwt = k8s.jwt_path.read_text()
    first_token = store.client.token
    k8s.reviewer.revoked.add(old_jwt)
    k8s.jwt_path.write_text(service_account_jwt(k8s.reviewer.key, "platform", "keyrotor", serial=2))
    start = datetime.now(timezone.utc)
    set_clock(lambda: start + timedelta(seconds=450))  # under a third left: renew-self, refused
    assert store.read_field(vault_mount, p, "api_key") == Secret("value-r")
    assert (store.auth.logins, store.auth.renewals) == (2, 0) and store.client.token != first_token
    assert k8s.reviewer.reviews == [True, False, True]  # login, refused renewal, login with the new JWT


def test_kubernetes_token_near_its_max_ttl_is_replaced_by_a_login_not_renewed_again(  # type: ignore[no-untyped-def]
        vault, root: hvac.Client, vault_mount: str, k8s: K8sSetup) -> None:
    """Near the role's max TTL the real server cuts a renewal short; renewing again could only
    shrink the token further (and past max TTL answers 500), so the next renewal is a login."""
    root.write_data(f"auth/{k8s.mount}/role/short", data={
        "bound_service_account_names": ["keyrotor"], "bound_service_account_namespaces": ["platform"],
        "token_policies": [k8s.policy], "token_ttl": "6s", "token_max_ttl": "8s"})
    store = make_store(vault.addr, vault_mount, vault_k8s_role="short", vault_k8s_mount=k8s.mount,
                       vault_k8s_jwt_path=str(k8s.jwt_path))
    p = path()
    store.write(vault_mount, p, {"api_key": "value-c"})
    start = datetime.now(timezone.utc)
    time.sleep(3.5)  # real time on the server, so that a renewal now runs into the 8 s max TTL
    set_clock(lambda: start + timedelta(seconds=4.5))  # our view: under a third of 6 s left, renew
    store.read_field(vault_mount, p, "api_key")
    assert (store.auth.logins, store.auth.renewals) == (1, 1)
    lease = store.auth.lease
    assert lease is not None and lease.capped and lease.remaining_s < 6
    first_token = store.client.token
    # Due again (under a third of the period left) but not expired: a capped token is not renewed.
    set_clock(lambda: lease.obtained_at + timedelta(seconds=lease.remaining_s - 1.5))
    assert store.read_field(vault_mount, p, "api_key") == Secret("value-c")
    assert (store.auth.logins, store.auth.renewals) == (2, 1) and store.client.token != first_token
    assert not store.auth.lease.capped


def test_kubernetes_login_refused_says_why(vault, vault_mount: str, k8s: K8sSetup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad_jwt = tmp_path / "bad-token"
    bad_jwt.write_text(service_account_jwt(new_signing_key(), "platform", "keyrotor"))  # not the cluster's key
    store = make_store(vault.addr, vault_mount, vault_k8s_role=k8s.role, vault_k8s_mount=k8s.mount,
                       vault_k8s_jwt_path=str(bad_jwt))
    with pytest.raises(VaultPermissionDenied, match="Kubernetes login as role 'keyrotor'"):
        store.read_current(vault_mount, path(), "api_key")
    assert k8s.reviewer.reviews == [False]  # the "cluster" refused the JWT, so Vault did
    missing = make_store(vault.addr, vault_mount, vault_k8s_role=k8s.role,
                         vault_k8s_jwt_path=str(tmp_path / "absent"))
    with pytest.raises(Exception, match="KEYROTOR_VAULT_K8S_JWT_PATH"):
        missing.read_current(vault_mount, path(), "api_key")


# ------------------------------------------------------------------ the shipped policy
def test_shipped_policy_allows_the_rotation_flow_and_nothing_more(vault, root: hvac.Client,  # type: ignore[no-untyped-def]
                                                                  shipped_policy_token: str) -> None:
    """config/vault-policy.hcl, unchanged, on the mounts it names (`secret`, `apps`)."""
    mount = "secret"
    s = make_store(vault.addr, mount, token=shipped_policy_token)
    p = f"apps/{uuid.uuid4().hex[:8]}/alloy"
    run_id = uuid.uuid4().hex
    admin = f"keyrotor/providers/{uuid.uuid4().hex[:6]}"
    root.secrets.kv.v2.create_or_update_secret(path=admin, secret={"admin_token": "provider-admin"}, mount_point=mount)

    assert s.read_field(mount, admin, "admin_token") == Secret("provider-admin")
    s.stage_pending(run_id, Secret("issued-value"), "k1")
    secret, key_id = s.read_pending(run_id)
    v1 = s.promote(mount, p, "api_key", secret, key_id, None)
    v2 = s.promote(mount, p, "api_key", Secret("issued-value-2"), "k2", v1)
    s.restore(mount, p, from_version=v1, expected_version=v2)
    s.set_custom_metadata(mount, p, {"keyrotor_run": run_id})
    assert s.custom_metadata(mount, p) == {"keyrotor_run": run_id}
    assert len(s.list_versions(mount, p)) == 3
    s.discard_pending(run_id)
    assert s.list_versions(mount, f"keyrotor/staging/{run_id}") == []
    copy = f"{uuid.uuid4().hex[:8]}/alloy"  # the vault_copy integration's mount
    assert s.write("apps", copy, {"token": "copied-value"}) == 1
    assert s.health().token_valid is True  # lookup-self granted without the default policy

    refused = [
        lambda: s.write(mount, admin, {"admin_token": "overwritten"}),          # provider credentials: read-only
        lambda: s.write(mount, f"other/{uuid.uuid4().hex[:6]}", {"a": "b"}),     # outside the managed prefixes
        lambda: s.read_field(mount, f"other/{uuid.uuid4().hex[:6]}", "a"),
        lambda: s.set_custom_metadata("apps", copy, {"keyrotor_run": run_id}),  # copies: no metadata writes
    ]
    for attempt in refused:
        with pytest.raises(VaultPermissionDenied) as info:
            attempt()
        assert info.value.status == 403
    with pytest.raises(hvac.exceptions.Forbidden):  # managed keys' history is never destroyed
        s.client.secrets.kv.v2.delete_metadata_and_all_versions(path=p, mount_point=mount)


# ------------------------------------------------------------------ token auth renewal
def test_token_auth_renews_below_a_third_of_ttl(vault, root: hvac.Client, vault_mount: str,  # type: ignore[no-untyped-def]
                                                proxy: FaultProxy) -> None:
    token = root.auth.token.create(policies=["root"], ttl="15m", renewable=True)["auth"]["client_token"]
    s = make_store(proxy.url, vault_mount, token=token)
    p = path()
    s.write(vault_mount, p, {"api_key": "value-t"})
    assert proxy.count("GET", "/auth/token/lookup-self") == 1 and s.auth.lease is not None
    start = datetime.now(timezone.utc)
    set_clock(lambda: start + timedelta(minutes=9))  # 6 of 15 minutes left: more than a third
    s.read_field(vault_mount, p, "api_key")
    assert proxy.count("POST", "/auth/token/renew-self") == 0
    set_clock(lambda: start + timedelta(minutes=11))  # 4 minutes left: renew
    s.read_field(vault_mount, p, "api_key")
    s.read_field(vault_mount, p, "api_key")
    assert proxy.count("POST", "/auth/token/renew-self") == 1 and s.auth.renewals == 1
    assert proxy.count("GET", "/auth/token/lookup-self") == 1  # looked up once, not per call


def test_token_capped_at_its_max_ttl_is_not_renewed_again_and_its_end_is_reported(  # type: ignore[no-untyped-def]
        vault, root: hvac.Client, vault_mount: str, proxy: FaultProxy) -> None:
    token = root.auth.token.create(policies=["root"], ttl="6s", explicit_max_ttl="8s",
                                   renewable=True)["auth"]["client_token"]
    s = make_store(proxy.url, vault_mount, token=token)
    p = path()
    s.write(vault_mount, p, {"api_key": "value-m"})
    start = datetime.now(timezone.utc)
    time.sleep(3.5)  # real time on the server, so that a renewal now runs into the 8 s max TTL
    set_clock(lambda: start + timedelta(seconds=4.5))
    s.read_field(vault_mount, p, "api_key")
    assert proxy.count("POST", "/auth/token/renew-self") == 1
    lease = s.auth.lease
    assert lease is not None and lease.capped
    set_clock(lambda: lease.obtained_at + timedelta(seconds=lease.remaining_s - 1.5))  # due, renewing cannot help
    s.read_field(vault_mount, p, "api_key")
    assert proxy.count("POST", "/auth/token/renew-self") == 1
    set_clock(lambda: lease.obtained_at + timedelta(seconds=lease.remaining_s + 1))
    with pytest.raises(VaultPermissionDenied, match="VAULT_TOKEN has reached its max TTL"):
        s.read_field(vault_mount, p, "api_key")


def test_expired_non_renewable_token_is_reported(vault, root: hvac.Client, vault_mount: str) -> None:  # type: ignore[no-untyped-def]
    token = root.auth.token.create(policies=["root"], ttl="5m", renewable=False)["auth"]["client_token"]
    s = make_store(vault.addr, vault_mount, token=token)
    p = path()
    s.write(vault_mount, p, {"api_key": "value-n"})
    start = datetime.now(timezone.utc)
    set_clock(lambda: start + timedelta(minutes=6))
    with pytest.raises(VaultPermissionDenied, match="VAULT_TOKEN has expired"):
        s.read_field(vault_mount, p, "api_key")


# ------------------------------------------------------------------ no secret in logs
def test_no_secret_in_log_events(vault, vault_mount: str, proxy: FaultProxy) -> None:  # type: ignore[no-untyped-def]
    from structlog.testing import capture_logs

    secret = Secret("sk_live_never_log_me_0123456789")
    s = make_store(proxy.url, vault_mount, token=vault.token)
    p = path()
    run_id = uuid.uuid4().hex
    with capture_logs() as events:  # raw event dicts, before any redaction processor
        s.stage_pending(run_id, secret, "k1")
        s.promote(vault_mount, p, "api_key", s.read_pending(run_id)[0], "k1", None)
        proxy.faults.append(Fault(f"/{vault_mount}/data/{p}", 503, times=1))
        s.promote(vault_mount, p, "api_key", Secret("sk_live_second_never_logged"), "k2", 1)
        s.discard_pending(run_id)
    dump = repr(events)
    assert "never_log_me" not in dump and "second_never_logged" not in dump
    assert secret.fingerprint in dump  # what we log instead
    assert any(e["event"] == "vault.retry" for e in events)
