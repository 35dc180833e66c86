"""The mount tables: secrets engines (``sys/mounts``) and auth methods (``sys/auth``)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from .errors import bad_request
from .kv1 import KvV1Engine
from .kv2 import KvV2Engine
from .timeutil import parse_duration

SYSTEM_DEFAULT_TTL = 768 * 3600  # Vault's default_lease_ttl / max_lease_ttl (32 days)
_BUILTIN = {"sys/": ("system", "system endpoints used for control, policy and debugging"),
            "cubbyhole/": ("cubbyhole", "per-token private secret storage"),
            "identity/": ("identity", "identity store")}
_RESERVED = ("sys/", "auth/", "cubbyhole/", "identity/")


def _accessor(kind: str) -> str:
    return f"{kind}_{uuid.uuid4().hex[:8]}"


@dataclass
class Mount:
    path: str  # with the trailing slash
    type: str
    description: str = ""
    options: dict[str, str] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    local: bool = False
    seal_wrap: bool = False
    engine: Any = None
    accessor: str = ""
    uuid: str = field(default_factory=lambda: str(uuid.uuid4()))

    def describe(self) -> dict[str, Any]:
        return {
            "accessor": self.accessor,
            "config": {
                "default_lease_ttl": int(self.config.get("default_lease_ttl", 0)),
                "force_no_cache": bool(self.config.get("force_no_cache", False)),
                "max_lease_ttl": int(self.config.get("max_lease_ttl", 0)),
            },
            "deprecation_status": "supported" if self.type in {"kv", "kubernetes"} else "",
            "description": self.description,
            "external_entropy_access": False,
            "local": self.local,
            "options": dict(self.options) if self.options is not None else None,
            "plugin_version": "",
            "running_plugin_version": "v0.16.1+builtin" if self.type == "kv" else "v1.15.6+builtin.vault",
            "running_sha256": "",
            "seal_wrap": self.seal_wrap,
            "type": self.type,
            "uuid": self.uuid,
        }

    def tune(self) -> dict[str, Any]:
        return {
            "default_lease_ttl": int(self.config.get("default_lease_ttl") or SYSTEM_DEFAULT_TTL),
            "max_lease_ttl": int(self.config.get("max_lease_ttl") or SYSTEM_DEFAULT_TTL),
            "force_no_cache": bool(self.config.get("force_no_cache", False)),
            "description": self.description,
            "options": dict(self.options) if self.options is not None else None,
        }


def _engine_for(kind: str, options: dict[str, str] | None) -> tuple[str, Any, dict[str, str] | None]:
    if kind in {"kv", "kv-v2", "kv-v1", "generic"}:
        version = str((options or {}).get("version", "2" if kind == "kv-v2" else "1"))
        if version not in {"1", "2"}:
            raise bad_request(f"invalid KV version: {version}")
        opts = dict(options or {})
        opts["version"] = version
        return "kv", (KvV2Engine() if version == "2" else KvV1Engine()), opts
    raise bad_request(f"plugin not found in the catalog: {kind}")


def _normalize(path: str) -> str:
    path = path.strip("/")
    if not path:
        raise bad_request("path cannot be empty")
    return path + "/"


def _parse_config(raw: Any) -> dict[str, Any]:
    config: dict[str, Any] = {}
    if isinstance(raw, dict):
        for name in ("default_lease_ttl", "max_lease_ttl"):
            if raw.get(name) not in (None, ""):
                config[name] = parse_duration(raw[name], field=name)
        if "force_no_cache" in raw:
            config["force_no_cache"] = bool(raw["force_no_cache"])
    return config


class MountTable:
    """Secrets-engine mounts, longest-prefix routed. ``secret/`` (KV v2) exists at start, as in
    ``vault server -dev``."""

    def __init__(self) -> None:
        self.mounts: dict[str, Mount] = {}
        for path, (kind, description) in _BUILTIN.items():
            self.mounts[path] = Mount(path, kind, description, accessor=_accessor(kind))
        self.enable("secret", {"type": "kv", "options": {"version": "2"}, "description": "key/value secret storage"})

    def enable(self, path: str, body: dict[str, Any]) -> None:
        path = _normalize(path)
        kind = str(body.get("type") or "")
        if not kind:
            raise bad_request("backend type must be specified as a string")
        if path.startswith(_RESERVED) or any(path.startswith(p) or p.startswith(path) for p in self.mounts):
            clash = next((p for p in self.mounts if path.startswith(p) or p.startswith(path)), path)
            raise bad_request(f"path is already in use at {clash}")
        kind, engine, options = _engine_for(kind, body.get("options"))
        self.mounts[path] = Mount(
            path, kind, str(body.get("description") or ""), options, _parse_config(body.get("config")),
            bool(body.get("local", False)), bool(body.get("seal_wrap", False)), engine, _accessor(kind),
        )

    def disable(self, path: str) -> None:
        path = _normalize(path)
        if path in _BUILTIN:
            raise bad_request(f"cannot unmount {path!r}")
        self.mounts.pop(path, None)

    def get(self, path: str) -> Mount | None:
        return self.mounts.get(_normalize(path))

    def route(self, logical_path: str) -> tuple[Mount, str] | None:
        """The mount owning the path and the path inside it."""
        best = None
        for prefix, mount in self.mounts.items():
            if (logical_path + "/").startswith(prefix) and (best is None or len(prefix) > len(best.path)):
                best = mount
        if best is None:
            return None
        return best, logical_path[len(best.path):]

    def tune(self, path: str, body: dict[str, Any]) -> None:
        mount = self.get(path)
        if mount is None:
            raise bad_request(f"cannot tune '{_normalize(path)}': no mount entry found")
        if "description" in body:
            mount.description = str(body["description"] or "")
        mount.config.update(_parse_config(body))
        options = body.get("options")
        if isinstance(options, dict) and mount.type == "kv":
            version = str(options.get("version", (mount.options or {}).get("version", "1")))
            if version == "2" and isinstance(mount.engine, KvV1Engine):  # Vault upgrades v1 data in place
                upgraded = KvV2Engine()
                upgraded.import_v1(mount.engine.values)
                mount.engine = upgraded
            elif version == "1" and isinstance(mount.engine, KvV2Engine):
                raise bad_request("cannot downgrade mount from KV version 2")
            mount.options = {**(mount.options or {}), **{k: str(v) for k, v in options.items()}}

    def listing(self) -> dict[str, Any]:
        return {path: mount.describe() for path, mount in sorted(self.mounts.items())}


class AuthTable:
    """Auth-method mounts under ``auth/``. ``token/`` is always there."""

    def __init__(self) -> None:
        self.mounts: dict[str, Mount] = {"token/": Mount("token/", "token", "token based credentials", accessor=_accessor("auth_token"))}

    def enable(self, path: str, body: dict[str, Any], factory: Any) -> None:
        path = _normalize(path)
        kind = str(body.get("type") or "")
        if path in self.mounts:
            raise bad_request(f"path is already in use at {path}")
        if kind != "kubernetes":
            raise bad_request(f"plugin not found in the catalog: {kind}")
        self.mounts[path] = Mount(path, kind, str(body.get("description") or ""), None, _parse_config(body.get("config")),
                                  bool(body.get("local", False)), bool(body.get("seal_wrap", False)), factory(path),
                                  _accessor(f"auth_{kind}"))

    def disable(self, path: str) -> None:
        path = _normalize(path)
        if path == "token/":
            raise bad_request("token credential backend cannot be disabled")
        self.mounts.pop(path, None)

    def route(self, logical_path: str) -> tuple[Mount, str] | None:
        """``logical_path`` is below ``auth/``."""
        for prefix in sorted(self.mounts, key=len, reverse=True):
            if (logical_path + "/").startswith(prefix):
                return self.mounts[prefix], logical_path[len(prefix):]
        return None

    def listing(self) -> dict[str, Any]:
        return {path: mount.describe() for path, mount in sorted(self.mounts.items())}
