"""The Kubernetes auth method: config, roles, and login with a service-account JWT.

Real Vault verifies the JWT either with a TokenReview call to the cluster or, when ``pem_keys``
is configured, locally against those public keys. There is no cluster here, so the stand-in
supports the ``pem_keys`` mode only (a config without keys refuses logins, saying why).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.x509 import load_pem_x509_certificate
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from .errors import VaultHTTPError, bad_request, not_found, unsupported_operation, unsupported_path
from .request import CREATE, DELETE, LIST, READ, UPDATE, Request, Result, as_bool, as_int, as_str_list
from .timeutil import parse_duration
from .tokens import Token, TokenStore

_ALGORITHMS = ["RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"]
_LEGACY_NS = "kubernetes.io/serviceaccount/namespace"
_LEGACY_NAME = "kubernetes.io/serviceaccount/service-account.name"
_LEGACY_UID = "kubernetes.io/serviceaccount/service-account.uid"
_LEGACY_SECRET = "kubernetes.io/serviceaccount/secret.name"


@dataclass
class Role:
    names: list[str]
    namespaces: list[str]
    policies: list[str] = field(default_factory=list)
    ttl: int = 0
    max_ttl: int = 0
    audience: str = ""
    num_uses: int = 0
    period: int = 0
    no_default_policy: bool = False

    def describe(self) -> dict[str, Any]:
        return {
            "alias_name_source": "serviceaccount_uid",
            "audience": self.audience,
            "bound_service_account_names": list(self.names),
            "bound_service_account_namespace_selector": "",
            "bound_service_account_namespaces": list(self.namespaces),
            "policies": list(self.policies),
            "token_policies": list(self.policies),
            "ttl": self.ttl,
            "token_ttl": self.ttl,
            "max_ttl": self.max_ttl,
            "token_max_ttl": self.max_ttl,
            "num_uses": self.num_uses,
            "token_num_uses": self.num_uses,
            "period": self.period,
            "token_period": self.period,
            "token_bound_cidrs": [],
            "token_explicit_max_ttl": 0,
            "token_no_default_policy": self.no_default_policy,
            "token_type": "default",
        }


def role_from_body(body: dict[str, Any], existing: Role | None = None) -> Role:
    role = existing or Role([], [])
    if "bound_service_account_names" in body:
        role.names = as_str_list(body["bound_service_account_names"])
    if "bound_service_account_namespaces" in body:
        role.namespaces = as_str_list(body["bound_service_account_namespaces"])
    if not role.names:
        raise bad_request('"bound_service_account_names" can not be empty')
    if not role.namespaces:
        raise bad_request('"bound_service_account_namespaces" can not be empty')
    if "token_policies" in body or "policies" in body:
        role.policies = as_str_list(body.get("token_policies", body.get("policies")))
    for name, attr in (("ttl", "ttl"), ("max_ttl", "max_ttl"), ("period", "period")):
        raw = body.get(f"token_{name}", body.get(name))
        if raw is not None:
            setattr(role, attr, parse_duration(raw, field=f"token_{name}"))
    if role.max_ttl and role.ttl > role.max_ttl:
        raise bad_request('"token_ttl" value must be less than "token_max_ttl" value')
    if "token_num_uses" in body or "num_uses" in body:
        role.num_uses = as_int(body.get("token_num_uses", body.get("num_uses")), "token_num_uses")
    if "audience" in body:
        role.audience = str(body["audience"] or "")
    if "token_no_default_policy" in body:
        role.no_default_policy = as_bool(body["token_no_default_policy"], "token_no_default_policy")
    return role


def _public_key(pem: str) -> Any:
    """A PEM public key, or the public key of a PEM certificate (both accepted by Vault)."""
    data = pem.strip().encode()
    try:
        if b"BEGIN CERTIFICATE" in data:
            return load_pem_x509_certificate(data).public_key()
        return load_pem_public_key(data)
    except (ValueError, TypeError):
        raise bad_request("data does not contain any valid RSA or ECDSA public keys") from None


def _bound(value: str, allowed: list[str]) -> bool:
    return any(pattern == "*" or pattern == value or fnmatch.fnmatchcase(value, pattern) for pattern in allowed)


def _service_account(claims: dict[str, Any]) -> tuple[str, str, str, str]:
    """(namespace, name, uid, secret name) from legacy or projected (``kubernetes.io``) claims."""
    nested = claims.get("kubernetes.io")
    if isinstance(nested, dict):
        account = nested.get("serviceaccount") or {}
        return (str(nested.get("namespace") or ""), str(account.get("name") or ""), str(account.get("uid") or ""), "")
    return (str(claims.get(_LEGACY_NS) or ""), str(claims.get(_LEGACY_NAME) or ""),
            str(claims.get(_LEGACY_UID) or ""), str(claims.get(_LEGACY_SECRET) or ""))


class KubernetesAuth:
    """One ``auth/<path>`` mount of type kubernetes. Callers hold the server lock."""

    mount_type = "kubernetes"

    def __init__(self, path: str) -> None:
        self.path = path.rstrip("/")
        self.config: dict[str, Any] | None = None
        self.verify_keys: list[Any] = []
        self.roles: dict[str, Role] = {}

    def existence(self, subpath: str) -> bool | None:
        if subpath.startswith("role/"):
            return subpath[5:] in self.roles
        if subpath == "config":
            return self.config is not None
        return None

    def unauthenticated(self, subpath: str) -> bool:
        return subpath == "login"

    def handle(self, req: Request, subpath: str, tokens: TokenStore) -> Result:
        op = req.operation
        if subpath == "login":
            if op not in (CREATE, UPDATE):
                raise unsupported_operation()
            return Result(auth=self.login(req.body, tokens).auth_block())
        if subpath == "config":
            if op in (CREATE, UPDATE):
                self.configure(req.body)
                return Result()
            if op == READ:
                if self.config is None:
                    return Result()
                return Result(data={k: v for k, v in self.config.items()})
            raise unsupported_operation()
        if subpath in {"role", "role/"} and op == LIST:
            if not self.roles:
                raise not_found()
            return Result(data={"keys": sorted(self.roles)})
        if subpath.startswith("role/") and subpath[5:]:
            name = subpath[5:]
            if op in (CREATE, UPDATE):
                self.roles[name] = role_from_body(req.body, self.roles.get(name))
                return Result()
            if op == READ:
                if name not in self.roles:
                    raise not_found()
                return Result(data=self.roles[name].describe())
            if op == DELETE:
                self.roles.pop(name, None)
                return Result()
            raise unsupported_operation()
        raise unsupported_path()

    def configure(self, body: dict[str, Any]) -> None:
        host = str(body.get("kubernetes_host") or "")
        if not host:
            raise bad_request("no host provided")
        raw_keys = body.get("pem_keys") or []
        pem_keys = [str(k) for k in raw_keys] if isinstance(raw_keys, list) else [str(raw_keys)]
        self.verify_keys = [_public_key(pem) for pem in pem_keys]
        self.config = {
            "kubernetes_host": host,
            "kubernetes_ca_cert": str(body.get("kubernetes_ca_cert") or ""),
            "pem_keys": pem_keys,
            "issuer": str(body.get("issuer") or ""),
            "disable_iss_validation": as_bool(body.get("disable_iss_validation", True), "disable_iss_validation"),
            "disable_local_ca_jwt": as_bool(body.get("disable_local_ca_jwt", False), "disable_local_ca_jwt"),
        }

    def _verify(self, token: str, role: Role) -> dict[str, Any]:
        assert self.config is not None
        if not self.verify_keys:
            raise VaultHTTPError(403, ["permission denied (the stand-in verifies JWTs with pem_keys only; "
                                       "configure auth/kubernetes/config with pem_keys)"])
        options = {"verify_aud": bool(role.audience)}  # exp/nbf are checked when present
        issuer = None if self.config["disable_iss_validation"] or not self.config["issuer"] else self.config["issuer"]
        for key in self.verify_keys:
            try:
                return jwt.decode(token, key, algorithms=_ALGORITHMS, audience=role.audience or None,
                                  issuer=issuer, options=options)
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError:
                raise VaultHTTPError(403, ["permission denied"]) from None
        raise VaultHTTPError(403, ["permission denied"])

    def login(self, body: dict[str, Any], tokens: TokenStore) -> Token:
        role_name = str(body.get("role") or "")
        token = str(body.get("jwt") or "")
        if not role_name:
            raise bad_request("missing role")
        if not token:
            raise bad_request("missing jwt")
        role = self.roles.get(role_name)
        if role is None:
            raise bad_request(f'invalid role name "{role_name}"')
        if self.config is None:
            raise bad_request("could not load backend configuration")
        claims = self._verify(token, role)
        namespace, name, uid, secret_name = _service_account(claims)
        if not _bound(name, role.names):
            raise VaultHTTPError(403, ["service account name not authorized"])
        if not _bound(namespace, role.namespaces):
            raise VaultHTTPError(403, ["namespace not authorized"])
        return tokens.issue(
            policies=role.policies,
            path=f"auth/{self.path}/login",
            display_name=f"{self.path}-{namespace}-{name}",
            ttl=role.ttl,
            max_ttl=role.max_ttl,
            renewable=True,
            meta={"role": role_name, "service_account_name": name, "service_account_namespace": namespace,
                  "service_account_uid": uid, "service_account_secret_name": secret_name},
            num_uses=role.num_uses,
            period=role.period,
            no_default_policy=role.no_default_policy,
        )
