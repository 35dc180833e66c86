"""Kubernetes auth through hvac over HTTP: configure with pem_keys, create roles, log in with
service-account JWTs signed by a throw-away RSA key (legacy and projected claim shapes)."""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator

import hvac
import jwt as pyjwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from hvac import exceptions

pytestmark = pytest.mark.integration


def _keypair() -> tuple[Any, str]:
    """An RSA key and a self-signed certificate for it (hvac's configure() insists on certificates)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "service-account-signer")])
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=30)).sign(key, hashes.SHA256()))
    return key, cert.public_bytes(serialization.Encoding.PEM).decode()


SIGNER, SIGNER_PEM = _keypair()
OTHER, _ = _keypair()


def legacy_jwt(namespace: str, name: str, *, key: Any = SIGNER, **extra: Any) -> str:
    claims = {
        "iss": "kubernetes/serviceaccount",
        "sub": f"system:serviceaccount:{namespace}:{name}",
        "kubernetes.io/serviceaccount/namespace": namespace,
        "kubernetes.io/serviceaccount/service-account.name": name,
        "kubernetes.io/serviceaccount/service-account.uid": str(uuid.uuid4()),
        "kubernetes.io/serviceaccount/secret.name": f"{name}-token-abcde",
        **extra,
    }
    return pyjwt.encode(claims, key, algorithm="RS256")


def projected_jwt(namespace: str, name: str, *, exp: int | None = None) -> str:
    now = int(time.time())
    claims = {
        "iss": "https://kubernetes.default.svc.cluster.local",
        "sub": f"system:serviceaccount:{namespace}:{name}",
        "aud": ["https://kubernetes.default.svc.cluster.local"],
        "iat": now, "nbf": now, "exp": exp if exp is not None else now + 3600,
        "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": name, "uid": str(uuid.uuid4())}},
    }
    return pyjwt.encode(claims, SIGNER, algorithm="RS256")


@pytest.fixture
def k8s(vault) -> Iterator[tuple[hvac.Client, str, str]]:  # type: ignore[no-untyped-def]
    """(root client, auth mount path, policy name) with a role "worker" bound to keyrotor/keyrotor-worker."""
    root = hvac.Client(url=vault.addr, token=vault.token)
    mount = f"k8s-{uuid.uuid4().hex[:8]}"
    policy = f"rotator-{uuid.uuid4().hex[:6]}"
    root.sys.create_or_update_acl_policy(policy, 'path "secret/data/rotor/*" { capabilities = ["read", "create", "update"] }')
    root.sys.enable_auth_method("kubernetes", path=mount)
    root.auth.kubernetes.configure("https://kubernetes.example:443", pem_keys=[SIGNER_PEM], mount_point=mount)
    root.auth.kubernetes.create_role(
        "worker", bound_service_account_names=["keyrotor-worker"], bound_service_account_namespaces=["keyrotor"],
        policies=[policy], ttl="1h", mount_point=mount,
    )
    yield root, mount, policy
    root.sys.disable_auth_method(mount)
    root.sys.delete_acl_policy(policy)
    root.adapter.close()


def test_role_round_trip(k8s) -> None:  # type: ignore[no-untyped-def]
    root, mount, policy = k8s
    role = root.auth.kubernetes.read_role("worker", mount_point=mount)  # hvac returns the data block
    assert role["bound_service_account_names"] == ["keyrotor-worker"]
    assert role["bound_service_account_namespaces"] == ["keyrotor"]
    assert role["token_policies"] == [policy] and role["token_ttl"] == 3600
    assert "worker" in root.auth.kubernetes.list_roles(mount_point=mount)["keys"]
    assert f"{mount}/" in root.sys.list_auth_methods()["data"]


@pytest.mark.parametrize("make_jwt", [legacy_jwt, projected_jwt], ids=["legacy-claims", "projected-claims"])
def test_login_issues_a_token_with_the_role_policies(k8s, vault, make_jwt) -> None:  # type: ignore[no-untyped-def]
    _, mount, policy = k8s
    client = hvac.Client(url=vault.addr)
    response = client.auth.kubernetes.login("worker", make_jwt("keyrotor", "keyrotor-worker"), mount_point=mount)
    auth = response["auth"]
    assert auth["client_token"] and auth["renewable"] is True and auth["lease_duration"] == 3600
    assert sorted(auth["policies"]) == sorted(["default", policy])
    assert auth["metadata"]["service_account_name"] == "keyrotor-worker"
    assert auth["metadata"]["service_account_namespace"] == "keyrotor"
    assert client.token == auth["client_token"]  # hvac uses it from then on
    client.secrets.kv.v2.create_or_update_secret("rotor/key", {"v": "1"}, mount_point="secret")
    with pytest.raises(exceptions.Forbidden):
        client.secrets.kv.v2.create_or_update_secret("elsewhere", {"v": "1"}, mount_point="secret")
    assert client.auth.token.lookup_self()["data"]["path"] == f"auth/{mount}/login"


@pytest.mark.parametrize("namespace, name, fragment", [
    ("keyrotor", "intruder", "service account name not authorized"),
    ("default", "keyrotor-worker", "namespace not authorized"),
])
def test_login_rejects_unbound_service_accounts(k8s, vault, namespace, name, fragment) -> None:  # type: ignore[no-untyped-def]
    _, mount, _ = k8s
    client = hvac.Client(url=vault.addr)
    with pytest.raises(exceptions.Forbidden) as info:
        client.auth.kubernetes.login("worker", legacy_jwt(namespace, name), mount_point=mount)
    assert fragment in info.value.errors[0]


def test_login_rejects_bad_signature_expired_jwt_and_unknown_role(k8s, vault) -> None:  # type: ignore[no-untyped-def]
    _, mount, _ = k8s
    client = hvac.Client(url=vault.addr)
    with pytest.raises(exceptions.Forbidden):
        client.auth.kubernetes.login("worker", legacy_jwt("keyrotor", "keyrotor-worker", key=OTHER), mount_point=mount)
    with pytest.raises(exceptions.Forbidden):
        client.auth.kubernetes.login("worker", projected_jwt("keyrotor", "keyrotor-worker", exp=int(time.time()) - 600), mount_point=mount)
    with pytest.raises(exceptions.InvalidRequest) as info:
        client.auth.kubernetes.login("nobody", legacy_jwt("keyrotor", "keyrotor-worker"), mount_point=mount)
    assert 'invalid role name "nobody"' in info.value.errors[0]


def test_wildcard_role_binding(k8s, vault) -> None:  # type: ignore[no-untyped-def]
    root, mount, policy = k8s
    root.auth.kubernetes.create_role("any", bound_service_account_names=["*"], bound_service_account_namespaces=["keyrotor"],
                                     policies=[policy], mount_point=mount)
    auth = hvac.Client(url=vault.addr).auth.kubernetes.login("any", legacy_jwt("keyrotor", "whoever"), mount_point=mount)["auth"]
    assert auth["metadata"]["service_account_name"] == "whoever"
