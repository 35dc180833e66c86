"""The ``sys/`` backend (health, seal, mounts, auth methods, policies, capabilities) and the
``auth/token/`` backend."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .errors import VaultHTTPError, bad_request, not_found, unsupported_operation, unsupported_path
from .k8s_auth import KubernetesAuth
from .request import CREATE, DELETE, LIST, READ, UPDATE, Request, Result, as_int, as_str_list

if TYPE_CHECKING:
    from .app import VaultApp

_WRITE = (CREATE, UPDATE)


class SystemBackend:
    def __init__(self, app: "VaultApp") -> None:
        self.app = app

    # ------------------------------------------------------------------ no token needed
    def unauthenticated(self, req: Request) -> Result:
        path = req.path
        if path == "sys/health":
            if req.operation != READ:
                raise unsupported_operation()
            return self._health(req.query)
        if path == "sys/seal-status":
            return Result(raw=self._seal_status())
        if path == "sys/leader":
            return Result(raw={"ha_enabled": False, "is_self": False, "active_time": "0001-01-01T00:00:00Z",
                               "leader_address": "", "leader_cluster_address": "", "performance_standby": False,
                               "performance_standby_last_remote_wal": 0})
        if path == "sys/init":
            return Result(raw={"initialized": True})
        if path == "sys/unseal":
            if req.operation not in _WRITE:
                raise unsupported_operation()
            if req.body.get("reset"):
                return Result(raw=self._seal_status())
            key = req.body.get("key")
            if not key:
                raise bad_request("'key' must be specified in request body as JSON, or 'reset' set to true")
            if key != self.app.unseal_key:
                raise bad_request("Unseal failed, invalid key")
            self.app.sealed = False
            return Result(raw=self._seal_status())
        raise unsupported_path()

    def _health(self, query: dict[str, str]) -> Result:
        app = self.app
        body = {
            "initialized": True,
            "sealed": app.sealed,
            "standby": False,
            "performance_standby": False,
            "replication_performance_mode": "disabled",
            "replication_dr_mode": "disabled",
            "server_time_utc": int(time.time()),
            "version": _version(),
            "enterprise": False,
            "cluster_name": app.cluster_name,
            "cluster_id": app.cluster_id,
        }
        if app.sealed:
            status = _code(query, "sealedcode", 503)
            body.pop("cluster_name")
            body.pop("cluster_id")
        else:
            status = _code(query, "activecode", 200)
        return Result(raw=body, status=status)

    def _seal_status(self) -> dict[str, Any]:
        return {"type": "shamir", "initialized": True, "sealed": self.app.sealed, "t": 1, "n": 1, "progress": 0,
                "nonce": "", "version": _version(), "build_date": "2024-01-01T00:00:00Z", "migration": False,
                "cluster_name": self.app.cluster_name, "cluster_id": self.app.cluster_id, "recovery_seal": False,
                "storage_type": "inmem"}

    # ------------------------------------------------------------------ sys/*
    def handle(self, req: Request, sub: str) -> Result:
        op = req.operation
        head, _, rest = sub.partition("/")
        if head == "mounts":
            return self._mounts(req, rest)
        if head == "auth":
            return self._auth_methods(req, rest)
        if head == "policies" and rest.startswith("acl"):
            return self._policies(req, rest[3:].lstrip("/"), legacy=False)
        if head == "policy":
            return self._policies(req, rest, legacy=True)
        if head in {"capabilities-self", "capabilities"} and not rest:
            if op not in _WRITE:
                raise unsupported_operation()
            return self._capabilities(req, self_only=head == "capabilities-self")
        if head == "seal" and not rest:
            if op not in _WRITE:
                raise unsupported_operation()
            self.app.sealed = True
            return Result()
        raise VaultHTTPError(404, [f'no handler for route "{req.path}". route entry not found.'])

    def _mounts(self, req: Request, rest: str) -> Result:
        op, table = req.operation, self.app.mounts
        if not rest:
            if op != READ:
                raise unsupported_operation()
            listing = table.listing()
            return Result(raw=self._legacy(listing))
        if rest.endswith("/tune"):
            path = rest[: -len("/tune")]
            if op == READ:
                mount = table.get(path)
                if mount is None:
                    raise bad_request(f"cannot fetch sysview for path {path.strip('/')}/")
                return Result(raw=self._legacy(mount.tune()))
            if op in _WRITE:
                table.tune(path, req.body)
                return Result()
            raise unsupported_operation()
        if op == READ:
            mount = table.get(rest)
            if mount is None:
                raise bad_request(f"No secret engine mount at {rest.strip('/')}/")
            return Result(data=mount.describe())
        if op in _WRITE:
            table.enable(rest, req.body)
            return Result()
        if op == DELETE:
            table.disable(rest)
            return Result()
        raise unsupported_operation()

    def _auth_methods(self, req: Request, rest: str) -> Result:
        op, table = req.operation, self.app.auth
        if not rest:
            if op != READ:
                raise unsupported_operation()
            return Result(raw=self._legacy(table.listing()))
        if rest.endswith("/tune"):
            raise unsupported_path()
        if op in _WRITE:
            table.enable(rest, req.body, KubernetesAuth)
            return Result()
        if op == DELETE:
            table.disable(rest)
            return Result()
        raise unsupported_operation()

    def _policies(self, req: Request, name: str, *, legacy: bool) -> Result:
        op, store = req.operation, self.app.policies
        name = name.strip("/")
        if not name:
            if op == LIST or (legacy and op == READ):
                keys = store.names()
                if legacy:
                    return Result(raw=self._legacy({"keys": keys, "policies": keys}))
                return Result(data={"keys": keys})
            raise unsupported_operation()
        if op == READ:
            if name.lower() == "root" and legacy:
                return Result(raw=self._legacy({"name": "root", "rules": ""}))
            text = store.get(name)
            if legacy:
                return Result(raw=self._legacy({"name": name.lower(), "rules": text}))
            return Result(data={"name": name.lower(), "policy": text})
        if op in _WRITE:
            text = req.body.get("policy", req.body.get("rules") if legacy else None)
            store.put(name, str(text or ""))
            return Result()
        if op == DELETE:
            store.delete(name)
            return Result()
        raise unsupported_operation()

    def _capabilities(self, req: Request, *, self_only: bool) -> Result:
        paths = as_str_list(req.body.get("paths") or req.body.get("path"))
        if not paths:
            raise bad_request("paths must be supplied")
        token = req.token
        if not self_only:
            token = self.app.tokens.lookup(str(req.body.get("token") or ""))
            if token is None:
                raise bad_request("invalid token")
        data: dict[str, Any] = {}
        merged: set[str] = set()
        for path in paths:
            caps = self.app.capabilities_of(token, path)
            data[path] = caps
            merged.update(caps)
        data["capabilities"] = sorted(merged)
        return Result(raw=self._legacy(data))

    def _legacy(self, data: dict[str, Any]) -> dict[str, Any]:
        """Some sys endpoints repeat their data at the top level of the envelope (Vault's
        backwards compatibility)."""
        envelope = self.app._envelope(data, None, "system")
        return {**data, **envelope}

    # ------------------------------------------------------------------ auth/token/*
    def token_handle(self, req: Request, sub: str) -> Result:
        store, token, op = self.app.tokens, req.token, req.operation
        if sub == "lookup-self" and op in (READ, *_WRITE):
            return Result(data=token.lookup_data())
        if sub == "renew-self" and op in _WRITE:
            store.renew(token, req.body.get("increment"))
            return Result(auth=token.auth_block())
        if sub == "revoke-self" and op in _WRITE:
            store.revoke(token)
            return Result()
        if sub in {"create", "create-orphan"} and op in _WRITE:
            sudo = token.is_root or self.app.policies.acl_for(token.policies).allows(req.path, "update", sudo=True)
            child = store.create_from_request(token, req.body, orphan_endpoint=sub == "create-orphan", sudo=sudo)
            return Result(auth=child.auth_block())
        if sub == "lookup" and op in _WRITE:
            other = store.lookup(str(req.body.get("token") or ""))
            if other is None:
                raise bad_request("bad token")
            return Result(data=other.lookup_data())
        if sub in {"revoke", "revoke-orphan"} and op in _WRITE:
            other = store.lookup(str(req.body.get("token") or ""))
            if other is not None:
                store.revoke(other, children=sub == "revoke")
            return Result()
        if sub == "renew" and op in _WRITE:
            other = store.lookup(str(req.body.get("token") or ""))
            if other is None:
                raise bad_request("invalid lease ID")
            store.renew(other, req.body.get("increment"))
            return Result(auth=other.auth_block())
        if sub in {"create", "lookup-self", "renew-self", "revoke-self", "lookup", "revoke", "revoke-orphan", "renew"}:
            raise unsupported_operation()
        raise not_found(f'no handler for route "{req.path}". route entry not found.')


def _code(query: dict[str, str], name: str, default: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    return as_int(raw, name)


def _version() -> str:
    from .app import VERSION

    return VERSION
