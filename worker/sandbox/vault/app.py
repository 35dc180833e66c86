"""Request handling independent of the HTTP server: routing, authentication, ACL enforcement,
the response envelope. One lock serialises requests (the stand-in favours exactness over
throughput)."""

from __future__ import annotations

import json
import secrets
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from .errors import VaultHTTPError, bad_request, invalid_token, multierror, not_found, unsupported_operation
from .k8s_auth import KubernetesAuth, role_from_body
from .mounts import AuthTable, MountTable
from .policies import PolicyStore
from .request import CREATE, DELETE, LIST, PATCH, READ, UPDATE, Request, Result
from .system import SystemBackend
from .tokens import Token, TokenStore

VERSION = "1.15.6"
_METHODS = {"GET": READ, "HEAD": READ, "LIST": LIST, "POST": UPDATE, "PUT": UPDATE, "DELETE": DELETE, "PATCH": PATCH}
# Paths that need no token (vault's "unauthenticated" special paths).
_UNAUTHENTICATED = {"sys/health", "sys/seal-status", "sys/leader", "sys/init", "sys/unseal"}
# Paths whose use needs "sudo" on top of the operation's capability (sys backend's root paths).
_SUDO_PREFIXES = ("sys/auth/", "sys/audit", "sys/raw", "sys/remount", "sys/seal", "sys/rotate", "sys/config/")


@dataclass
class Response:
    status: int
    body: bytes = field(repr=False)  # may carry secrets or tokens
    headers: dict[str, str]


def _json(status: int, payload: Any) -> Response:
    return Response(status, json.dumps(payload).encode(), {"Content-Type": "application/json", "Cache-Control": "no-store"})


class VaultApp:
    def __init__(self, root_token: str, *, cluster_name: str = "vault-cluster-standin") -> None:
        self.lock = threading.RLock()
        self.mounts = MountTable()
        self.auth = AuthTable()
        self.tokens = TokenStore()
        self.policies = PolicyStore()
        self.tokens.create_root(root_token)
        self.sealed = False
        self.unseal_key = secrets.token_urlsafe(24)
        self.cluster_name = cluster_name
        self.cluster_id = str(uuid.uuid4())
        self.system = SystemBackend(self)

    # ------------------------------------------------------------------ conveniences for tests/CLI
    def enable_kubernetes(self, path: str = "kubernetes", *, pem_keys: list[str] | None = None,
                          host: str = "https://kubernetes.default.svc", roles: dict[str, dict[str, Any]] | None = None) -> KubernetesAuth:
        with self.lock:
            if f"{path}/" not in self.auth.mounts:
                self.auth.enable(path, {"type": "kubernetes"}, KubernetesAuth)
            engine: KubernetesAuth = self.auth.mounts[f"{path}/"].engine
            if pem_keys:
                engine.configure({"kubernetes_host": host, "pem_keys": pem_keys})
            for name, body in (roles or {}).items():
                engine.roles[name] = role_from_body(body)
            return engine

    # ------------------------------------------------------------------ entry point
    def handle(self, method: str, raw_path: str, query: dict[str, str], headers: dict[str, str], body: bytes) -> Response:
        method = method.upper()
        if not raw_path.startswith("/v1/"):
            return _json(404, {"errors": []})
        path = raw_path[len("/v1/"):]
        try:
            if method not in _METHODS:
                raise VaultHTTPError(405, [])
            operation = _METHODS[method]
            if method == "GET" and query.get("list", "").lower() in {"true", "1"}:
                operation = LIST
            parsed = _parse_body(body)
            req = Request(operation, path, query, parsed, headers.get("content-type", ""))
            token_id = headers.get("x-vault-token") or _bearer(headers.get("authorization", ""))
            with self.lock:
                result = self._dispatch(req, token_id)
        except VaultHTTPError as exc:
            if exc.body is not None:
                return _json(exc.status, self._envelope(exc.body.get("data"), None, "kv"))
            return _json(exc.status, {"errors": exc.errors})
        if method == "HEAD":
            return Response(result.status, b"", {"Content-Type": "application/json"})
        if result.raw is not None:
            return _json(result.status, result.raw)
        if result.data is None and result.auth is None:
            return Response(204, b"", {"Cache-Control": "no-store"})
        envelope = self._envelope(result.data, result.auth, result.mount_type, result.warnings)
        return _json(result.status, envelope)

    @staticmethod
    def _envelope(data: Any, auth: Any, mount_type: str, warnings: list[str] | None = None) -> dict[str, Any]:
        return {
            "request_id": str(uuid.uuid4()), "lease_id": "", "renewable": False, "lease_duration": 0,
            "data": data, "wrap_info": None, "warnings": warnings, "auth": auth, "mount_type": mount_type,
        }

    # ------------------------------------------------------------------ routing
    def _dispatch(self, req: Request, token_id: str | None) -> Result:
        path = req.path
        if path.rstrip("/") in _UNAUTHENTICATED:
            req.path = path.rstrip("/")
            return self.system.unauthenticated(req)
        if self.sealed:
            raise VaultHTTPError(503, ["Vault is sealed"])
        login = self._login_route(path)
        if login is not None:
            if req.operation not in (CREATE, UPDATE):
                raise unsupported_operation()
            return login.handle(req, "login", self.tokens)
        token = self._authenticate(token_id)
        req.token = token
        backend = self._resolve(path)
        self._authorize(req, token, backend)
        self.tokens.use(token)
        try:
            return self._call(req, backend)
        finally:
            self.tokens.finish(token)

    def _login_route(self, path: str) -> KubernetesAuth | None:
        if not path.startswith("auth/"):
            return None
        routed = self.auth.route(path[len("auth/"):])
        if routed is None:
            return None
        mount, sub = routed
        if isinstance(mount.engine, KubernetesAuth) and mount.engine.unauthenticated(sub):
            return mount.engine
        return None

    def _authenticate(self, token_id: str | None) -> Token:
        if not token_id:
            raise VaultHTTPError(403, ["permission denied"])
        token = self.tokens.lookup(token_id)
        if token is None:
            raise invalid_token()
        return token

    def _resolve(self, path: str) -> tuple[str, Any, str]:
        """(kind, engine-or-None, sub-path) where kind is sys, token, auth or secret."""
        if path == "sys" or path.startswith("sys/"):
            return "sys", None, path[4:]
        if path.startswith("auth/"):
            routed = self.auth.route(path[5:])
            if routed is not None:
                mount, sub = routed
                return ("token", None, sub) if mount.type == "token" else ("auth", mount.engine, sub)
            return "missing", None, path
        routed_secret = self.mounts.route(path)
        if routed_secret is None or routed_secret[0].engine is None:
            return "missing", None, path
        return "secret", routed_secret[0].engine, routed_secret[1]

    def _authorize(self, req: Request, token: Token, backend: tuple[str, Any, str]) -> None:
        kind, engine, sub = backend
        if req.operation == UPDATE:
            exists = engine.existence(sub) if engine is not None and hasattr(engine, "existence") else None
            if exists is False:
                req.operation = CREATE
        if token.is_root:
            return
        acl = self.policies.acl_for(token.policies)
        sudo = req.path.startswith(_SUDO_PREFIXES)
        if not acl.allows(req.path, req.operation, sudo=sudo):
            raise VaultHTTPError(403, [multierror("permission denied")])

    def _call(self, req: Request, backend: tuple[str, Any, str]) -> Result:
        kind, engine, sub = backend
        if kind == "sys":
            result = self.system.handle(req, sub)
            result.mount_type = result.mount_type or "system"
            return result
        if kind == "token":
            result = self.system.token_handle(req, sub)
            result.mount_type = "token"
            return result
        if kind == "auth":
            result = engine.handle(req, sub, self.tokens)
            result.mount_type = "kubernetes"
            return result
        if kind == "secret":
            result = engine.handle(req, sub)
            result.mount_type = "kv"
            return result
        raise not_found(f'no handler for route "{req.path}". route entry not found.')

    # used by SystemBackend for capabilities-self
    def capabilities_of(self, token: Token, path: str) -> list[str]:
        if token.is_root:
            return ["root"]
        caps = self.policies.acl_for(token.policies).capabilities(path)
        return sorted(caps)


def _bearer(value: str) -> str | None:
    if value.lower().startswith("bearer "):
        return value[7:].strip() or None
    return None


def _parse_body(body: bytes) -> dict[str, Any]:
    if not body or not body.strip():
        return {}
    try:
        parsed = json.loads(body)
    except ValueError as exc:
        raise bad_request(f"failed to parse JSON input: {exc}") from None
    if not isinstance(parsed, dict):
        raise bad_request("failed to parse JSON input: expected a JSON object")
    return parsed

