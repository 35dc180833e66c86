"""The KV version 2 secrets engine: versioned keys, soft delete, destroy, check-and-set, metadata.

Semantics follow vault-plugin-secrets-kv: a version is "deleted" once its deletion_time has passed
(explicit delete, or created_time + delete_version_after); deleted and destroyed versions read as
404 *with* the envelope (data null, metadata filled); ``max_versions`` (key, else mount, else 10)
trims the oldest versions on write; ``oldest_version`` stays 0 until trimming moves it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from .errors import VaultHTTPError, bad_request, not_found, unsupported_operation, unsupported_path
from .request import CREATE, DELETE, LIST, PATCH, READ, UPDATE, Request, Result, as_bool, as_int
from .timeutil import format_duration, now, parse_duration, rfc3339

DEFAULT_MAX_VERSIONS = 10
CUSTOM_METADATA_MAX_KEYS = 64
CUSTOM_METADATA_MAX_KEY_LEN = 128
CUSTOM_METADATA_MAX_VALUE_LEN = 512


@dataclass
class Version:
    created: datetime
    data: dict[str, Any] | None = field(repr=False)  # secret values
    deletion: datetime | None = None
    destroyed: bool = False

    def is_deleted(self, at: datetime) -> bool:
        return self.deletion is not None and self.deletion <= at

    def meta(self) -> dict[str, Any]:
        return {"created_time": rfc3339(self.created), "deletion_time": rfc3339(self.deletion), "destroyed": self.destroyed}


@dataclass
class KeyMeta:
    created: datetime
    updated: datetime
    current_version: int = 0
    oldest_version: int = 0
    max_versions: int = 0
    cas_required: bool = False
    delete_version_after: int = 0  # seconds; 0 = not set
    custom_metadata: dict[str, str] | None = None
    versions: dict[int, Version] = field(default_factory=dict)


@dataclass
class KvV2Config:
    max_versions: int = 0
    cas_required: bool = False
    delete_version_after: int = 0


class KvV2Engine:
    """One mount's worth of KV v2 state. Callers hold the server lock."""

    mount_type = "kv"

    def __init__(self) -> None:
        self.config = KvV2Config()
        self.keys: dict[str, KeyMeta] = {}

    # ------------------------------------------------------------------ routing
    def existence(self, subpath: str) -> bool | None:
        """For the create/update capability choice; None where the path has no existence check."""
        section, _, key = subpath.partition("/")
        if section in {"data", "metadata"}:
            return key in self.keys
        if section == "config":
            return True
        return None

    def handle(self, req: Request, subpath: str) -> Result:
        section, _, key = subpath.partition("/")
        op = req.operation
        if section == "config" and not key:
            if op == READ:
                return self._read_config()
            if op in (CREATE, UPDATE):
                return self._write_config(req.body)
            raise unsupported_operation()
        if section == "data":
            if op == READ:
                return self._read(key, req.query)
            if op in (CREATE, UPDATE):
                return self._write(key, req.body)
            if op == PATCH:
                return self._patch(key, req)
            if op == DELETE:
                return self._delete_latest(key)
            raise unsupported_operation()
        if section == "metadata":
            if op == LIST:
                return self._list(key)
            if op == READ:
                return self._read_metadata(key)
            if op in (CREATE, UPDATE):
                return self._write_metadata(key, req.body, patch=False)
            if op == PATCH:
                return self._write_metadata(key, req.body, patch=True)
            if op == DELETE:
                self.keys.pop(key, None)
                return Result()
            raise unsupported_operation()
        if section in {"delete", "undelete", "destroy"} and key:
            if op not in (CREATE, UPDATE):
                raise unsupported_operation()
            return self._versions_op(section, key, req.body)
        if section == "subkeys" and key:
            if op != READ:
                raise unsupported_operation()
            return self._subkeys(key, req.query)
        raise unsupported_path()

    # ------------------------------------------------------------------ config
    def _read_config(self) -> Result:
        return Result(
            data={
                "cas_required": self.config.cas_required,
                "delete_version_after": format_duration(self.config.delete_version_after),
                "max_versions": self.config.max_versions,
            }
        )

    def _write_config(self, body: dict[str, Any]) -> Result:
        if "max_versions" in body:
            value = as_int(body["max_versions"], "max_versions")
            self.config.max_versions = value
        if "cas_required" in body:
            self.config.cas_required = as_bool(body["cas_required"], "cas_required")
        if "delete_version_after" in body:
            dva = parse_duration(body["delete_version_after"], field="delete_version_after")
            self.config.delete_version_after = -1 if dva < 0 else dva
        return Result()

    # ------------------------------------------------------------------ helpers
    def _max_versions(self, meta: KeyMeta) -> int:
        return meta.max_versions or self.config.max_versions or DEFAULT_MAX_VERSIONS

    def _effective_dva(self, meta: KeyMeta) -> int:
        """Key's delete_version_after, else the mount's; the lower one when both are set; a
        negative mount setting disables it everywhere."""
        mount = self.config.delete_version_after
        if mount < 0:
            return 0
        key = meta.delete_version_after
        if key > 0 and mount > 0:
            return min(key, mount)
        return key if key > 0 else mount

    def _version_metadata(self, meta: KeyMeta, number: int, version: Version) -> dict[str, Any]:
        out = version.meta()
        out["version"] = number
        out["custom_metadata"] = copy.deepcopy(meta.custom_metadata)
        return out

    def _metadata_body(self, meta: KeyMeta) -> dict[str, Any]:
        return {
            "cas_required": meta.cas_required,
            "created_time": rfc3339(meta.created),
            "current_version": meta.current_version,
            "custom_metadata": copy.deepcopy(meta.custom_metadata),
            "delete_version_after": format_duration(meta.delete_version_after),
            "max_versions": meta.max_versions,
            "oldest_version": meta.oldest_version,
            "updated_time": rfc3339(meta.updated),
            "versions": {str(n): v.meta() for n, v in sorted(meta.versions.items())},
        }

    def _pick_version(self, key: str, query: dict[str, str]) -> tuple[KeyMeta, int, Version]:
        meta = self.keys.get(key)
        if meta is None:
            raise not_found()
        number = as_int(query.get("version") or 0, "version")
        if number == 0:
            number = meta.current_version
        version = meta.versions.get(number)
        if version is None:
            raise not_found()
        return meta, number, version

    # ------------------------------------------------------------------ data
    def _read(self, key: str, query: dict[str, str]) -> Result:
        if not key:
            raise unsupported_path()
        meta, number, version = self._pick_version(key, query)
        metadata = self._version_metadata(meta, number, version)
        if version.destroyed or version.is_deleted(now()):
            body = {"data": {"data": None, "metadata": metadata}}
            raise VaultHTTPError(404, [], body=body)
        return Result(data={"data": copy.deepcopy(version.data), "metadata": metadata})

    def _check_cas(self, meta: KeyMeta | None, options: Any) -> None:
        cas = options.get("cas") if isinstance(options, dict) else None
        required = self.config.cas_required or (meta is not None and meta.cas_required)
        if cas is None:
            if required:
                raise bad_request("check-and-set parameter required for this call")
            return
        cas_value = as_int(cas, "cas")
        current = meta.current_version if meta is not None else 0
        if cas_value != current:
            raise bad_request("check-and-set parameter did not match the current version")

    def _store_version(self, key: str, meta: KeyMeta | None, data: dict[str, Any]) -> Result:
        at = now()
        if meta is None:
            meta = KeyMeta(created=at, updated=at)
            self.keys[key] = meta
        number = meta.current_version + 1
        dva = self._effective_dva(meta)
        version = Version(created=at, data=copy.deepcopy(data), deletion=at + timedelta(seconds=dva) if dva > 0 else None)
        meta.versions[number] = version
        meta.current_version = number
        meta.updated = at
        self._trim(meta)
        return Result(data=self._version_metadata(meta, number, version))

    def _trim(self, meta: KeyMeta) -> None:
        keep = self._max_versions(meta)
        oldest_kept = meta.current_version - keep + 1
        if oldest_kept <= 1:
            return
        for number in [n for n in meta.versions if n < oldest_kept]:
            del meta.versions[number]
        meta.oldest_version = max(meta.oldest_version, oldest_kept)

    def _write(self, key: str, body: dict[str, Any]) -> Result:
        if not key:
            raise unsupported_path()
        data = body.get("data")
        if not isinstance(data, dict) or not data:
            raise bad_request("no data provided")
        meta = self.keys.get(key)
        self._check_cas(meta, body.get("options"))
        return self._store_version(key, meta, data)

    def _patch(self, key: str, req: Request) -> Result:
        if req.content_type.split(";")[0].strip().lower() != "application/merge-patch+json":
            raise VaultHTTPError(415, ["PATCH requires Content-Type application/merge-patch+json"])
        data = req.body.get("data")
        if not isinstance(data, dict):
            raise bad_request("no data provided")
        meta = self.keys.get(key)
        if meta is None or meta.current_version not in meta.versions:
            raise not_found()
        current = meta.versions[meta.current_version]
        if current.destroyed or current.is_deleted(now()):
            raise not_found()
        self._check_cas(meta, req.body.get("options"))
        merged = _merge_patch(copy.deepcopy(current.data or {}), data)
        return self._store_version(key, meta, merged)

    def _delete_latest(self, key: str) -> Result:
        meta = self.keys.get(key)
        if meta is None:
            return Result()
        version = meta.versions.get(meta.current_version)
        at = now()
        if version is not None and not version.destroyed and not version.is_deleted(at):
            version.deletion = at
            meta.updated = at
        return Result()

    def _versions_op(self, action: str, key: str, body: dict[str, Any]) -> Result:
        raw = body.get("versions")
        if raw is None or raw == [] or raw == "":
            raise bad_request("no version number provided")
        items = raw if isinstance(raw, list) else str(raw).split(",")
        numbers = [as_int(v, "versions") for v in items]
        meta = self.keys.get(key)
        if meta is None:
            return Result()
        at = now()
        for number in numbers:
            version = meta.versions.get(number)
            if version is None:
                continue
            if action == "delete":
                if not version.destroyed and not version.is_deleted(at):
                    version.deletion = at
            elif action == "undelete":
                if not version.destroyed:
                    version.deletion = None
            else:  # destroy
                version.destroyed = True
                version.data = None
        meta.updated = at
        return Result()

    def _subkeys(self, key: str, query: dict[str, str]) -> Result:
        meta, number, version = self._pick_version(key, query)
        depth = as_int(query.get("depth") or 0, "depth")
        metadata = self._version_metadata(meta, number, version)
        metadata.pop("custom_metadata", None)
        if version.destroyed or version.is_deleted(now()):
            raise VaultHTTPError(404, [], body={"data": {"subkeys": None, "metadata": metadata}})
        return Result(data={"subkeys": _subkeys(version.data or {}, depth, 1), "metadata": metadata})

    # ------------------------------------------------------------------ metadata
    def _read_metadata(self, key: str) -> Result:
        meta = self.keys.get(key)
        if meta is None:
            raise not_found()
        return Result(data=self._metadata_body(meta))

    def _write_metadata(self, key: str, body: dict[str, Any], *, patch: bool) -> Result:
        if not key:
            raise unsupported_path()
        meta = self.keys.get(key)
        if patch and meta is None:
            raise not_found()
        updates: dict[str, Any] = {}
        if "max_versions" in body and body["max_versions"] is not None:
            updates["max_versions"] = as_int(body["max_versions"], "max_versions")
            if updates["max_versions"] < 0:
                raise bad_request("max_versions must be greater than or equal to 0")
        if "cas_required" in body and body["cas_required"] is not None:
            updates["cas_required"] = as_bool(body["cas_required"], "cas_required")
        if "delete_version_after" in body and body["delete_version_after"] is not None:
            dva = parse_duration(body["delete_version_after"], field="delete_version_after")
            if dva < 0:
                raise bad_request("delete_version_after cannot be negative")
            updates["delete_version_after"] = dva
        if "custom_metadata" in body:
            updates["custom_metadata"] = _validate_custom_metadata(body["custom_metadata"], patch=patch, old=meta)
        at = now()
        if meta is None:
            meta = KeyMeta(created=at, updated=at)
            self.keys[key] = meta
        for name, value in updates.items():
            setattr(meta, name, value)
        meta.updated = at
        return Result()

    def _list(self, prefix: str) -> Result:
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        children: set[str] = set()
        for key in self.keys:
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            head, sep, _ = rest.partition("/")
            children.add(head + sep)
        if not children:
            raise not_found()
        return Result(data={"keys": sorted(children)})

    # ------------------------------------------------------------------ kv v1 → v2 upgrade
    def import_v1(self, data: dict[str, dict[str, Any]]) -> None:
        for key, value in data.items():
            self._store_version(key, None, value)


def _merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch (null removes a key)."""
    for name, value in patch.items():
        if value is None:
            target.pop(name, None)
        elif isinstance(value, dict) and isinstance(target.get(name), dict):
            target[name] = _merge_patch(target[name], value)
        else:
            target[name] = copy.deepcopy(value)
    return target


def _subkeys(data: dict[str, Any], depth: int, level: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in data.items():
        if isinstance(value, dict) and (depth == 0 or level < depth):
            out[name] = _subkeys(value, depth, level + 1)
        else:
            out[name] = None
    return out


def _validate_custom_metadata(value: Any, *, patch: bool, old: KeyMeta | None) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_request('error converting input for field "custom_metadata": expected a map of strings')
    result: dict[str, str] = dict(old.custom_metadata or {}) if (patch and old is not None) else {}
    problems: list[str] = []
    for name, item in value.items():
        if patch and item is None:
            result.pop(name, None)
            continue
        if not isinstance(item, str):
            raise bad_request('error converting input for field "custom_metadata": expected a map of strings')
        if len(name) > CUSTOM_METADATA_MAX_KEY_LEN:
            problems.append(f"length of key {name!r} is {len(name)} which exceeds the limit of {CUSTOM_METADATA_MAX_KEY_LEN}")
        if len(item) > CUSTOM_METADATA_MAX_VALUE_LEN:
            problems.append(f"length of value for key {name!r} is {len(item)} which exceeds the limit of {CUSTOM_METADATA_MAX_VALUE_LEN}")
        result[name] = item
    if len(result) > CUSTOM_METADATA_MAX_KEYS:
        problems.append(f"payload must contain at most {CUSTOM_METADATA_MAX_KEYS} keys, provided {len(result)}")
    if problems:
        from .errors import multierror

        raise bad_request(multierror(*problems))
    return result
