"""keyrotor's view of Vault KV v2: current/previous versions of managed keys, staging of issued
keys, check-and-set promotion and restore, custom metadata. Contract: docs/internals.md.

Every call goes through ``_call``: the auth refreshes the token if needed, hvac/requests errors
are mapped to ``worker.vault.errors``, transient ones (5xx, sealed, 429, timeouts, connection
errors) are retried with backoff and jitter, 4xx are not. With Kubernetes auth a 403 caused by
an expired token triggers one re-login and one retry.

Values come back as ``Secret``; logs carry fingerprints only.
"""

from __future__ import annotations

import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, TypeVar

import hvac
import hvac.exceptions as hvac_exc
import requests

from worker.log import get_logger
from worker.retry import retry_call
from worker.secret import Secret
from worker.text import key_slug
from worker.vault.auth import KubernetesAuth, TokenAuth, VaultAuth
from worker.vault.errors import (
    Operation,
    VaultAuthConfigError,
    VaultCheckAndSetMismatch,
    VaultError,
    VaultInvalidRequest,
    VaultNotFound,
    VaultPermissionDenied,
    VaultUnavailable,
    garbage_response,
    map_hvac_error,
    map_transport_error,
)
from worker.vault.transport import build_client

if TYPE_CHECKING:
    from worker.settings import Settings

T = TypeVar("T")
log = get_logger(__name__)

#: Field next to the secret that records the provider's id of the key, for revocation later.
KEY_ID_FIELD = "keyrotor_key_id"
_STAGING_SECRET, _STAGING_KEY_ID, _STAGING_EXPIRES_AT = "secret", "key_id", "expires_at"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


_memo = threading.local()


@contextmanager
def remembering_versions() -> Iterator[None]:
    """Within this block (one chain of steps on this thread), a numbered version of a KV v2 path
    that was read or written once is not read again. A version's data never changes once written
    (it can only be deleted or destroyed), so this saves a round trip, not a check: ``promote``
    carries over the fields of the version ``issue`` just read, ``retire`` finds the old secret
    it read. What the path serves *now* (``read_current``) is always asked. Forgotten on exit."""
    _memo.versions = {}
    try:
        yield
    finally:
        _memo.versions = None


def _memo_versions() -> dict[tuple[str, str, str, int], "_Read"] | None:
    return getattr(_memo, "versions", None)


@dataclass(frozen=True)
class StoredSecret:
    secret: Secret
    version: int
    provider_key_id: str | None


@dataclass(frozen=True)
class Deposit:
    """What an owner wrote at a key's deposit path: the credential and, if they gave one, the
    name they signed with (``deposited_by``: *claimed* — KV v2 does not record the writer)."""

    secret: Secret
    claimed_by: str | None
    version: int
    created_at: datetime | None


#: Fields an owner writes at a deposit path.
DEPOSIT_FIELD, DEPOSIT_BY_FIELD = "credential", "deposited_by"


@dataclass(frozen=True)
class VersionInfo:
    version: int
    created_at: datetime | None
    deleted_at: datetime | None  # soft-deleted (recoverable with undelete)
    destroyed: bool
    current: bool

    @property
    def readable(self) -> bool:
        return self.deleted_at is None and not self.destroyed


@dataclass(frozen=True)
class VaultHealth:
    """What ``sys/health`` and ``lookup-self`` say; ``ok`` means calls can be expected to work."""

    reachable: bool
    initialized: bool = False
    sealed: bool = True
    standby: bool = False
    version: str | None = None
    token_valid: bool | None = None  # None: not checked (Vault unreachable or sealed)
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.reachable and self.initialized and not self.sealed and self.token_valid is not False


@dataclass(frozen=True)
class _Read:
    """One KV v2 read: ``data`` is None when the version is soft-deleted or destroyed."""

    data: dict[str, Any] | None
    version: int
    deleted_at: str
    destroyed: bool


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value or value.startswith("0001-01-01"):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _clean_path(path: str, what: str = "path") -> str:
    cleaned = path.strip("/")
    if not cleaned or any(part in ("", ".", "..") for part in cleaned.split("/")):
        raise VaultInvalidRequest(f"invalid Vault {what} {path!r}: expected a relative path such as 'apps/billing/stripe'")
    return cleaned


def _as_str_map(values: Mapping[str, Any], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in values.items():
        if isinstance(value, Secret):
            value = value.reveal()
        if not isinstance(key, str) or not isinstance(value, str):
            raise VaultInvalidRequest(f"{what}: field {key!r} must map a string to a string")
        out[key] = value
    return out


class VaultStore:
    """See the module docstring and docs/internals.md ("Vault store")."""

    def __init__(
        self,
        client: hvac.Client,
        auth: VaultAuth,
        *,
        addr: str,
        staging_mount: str = "secret",
        staging_prefix: str = "keyrotor/staging",
        deposit_prefix: str = "keyrotor/deposits",
        retry_attempts: int = 4,
        retry_base_delay: float = 0.2,
        retry_max_delay: float = 3.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._client = client
        self._auth = auth
        self._addr = addr
        self.staging_mount = staging_mount.strip("/")
        self.staging_prefix = _clean_path(staging_prefix, "staging prefix")
        self.deposit_prefix = _clean_path(deposit_prefix, "deposit prefix")
        self._attempts = retry_attempts
        self._base_delay = retry_base_delay
        self._max_delay = retry_max_delay
        self._sleep = sleep
        self.requests = 0  # HTTP calls made for store operations (auth calls not included)

    @classmethod
    def from_settings(cls, settings: "Settings", *, session: requests.Session | None = None, **kwargs: Any) -> "VaultStore":
        """Token auth when VAULT_TOKEN is set, else Kubernetes auth with KEYROTOR_VAULT_K8S_ROLE."""
        if not settings.vault_addr:
            raise VaultAuthConfigError("VAULT_ADDR is not set: point it at Vault, e.g. https://vault.example:8200")
        auth: VaultAuth
        if settings.vault_token:
            auth = TokenAuth(settings.vault_token)
        elif settings.vault_k8s_role:
            auth = KubernetesAuth(settings.vault_k8s_role, mount=settings.vault_k8s_mount,
                                  jwt_path=settings.vault_k8s_jwt_path)
        else:
            raise VaultAuthConfigError("no Vault credentials: set VAULT_TOKEN or KEYROTOR_VAULT_K8S_ROLE")
        client = build_client(settings.vault_addr, namespace=settings.vault_namespace, cacert=settings.vault_cacert,
                              timeout=settings.vault_timeout_s, session=session, skip_verify=settings.vault_skip_verify)
        return cls(client, auth, addr=settings.vault_addr, staging_mount=settings.vault_mount,
                   staging_prefix=settings.vault_staging_prefix, deposit_prefix=settings.vault_deposit_prefix,
                   **kwargs)

    @property
    def auth(self) -> VaultAuth:
        return self._auth

    @property
    def client(self) -> hvac.Client:
        return self._client

    # ------------------------------------------------------------------ managed keys
    def read_current(self, mount: str, path: str, field: str) -> StoredSecret | None:
        """The newest version's secret, or None when the path does not exist."""
        read = self._read(mount, path, None)
        if read is None:
            return None
        return self._stored(read, mount, path, field)

    def read_version(self, mount: str, path: str, field: str, version: int) -> StoredSecret:
        read = self._read(mount, path, version)
        if read is None:
            raise VaultNotFound(f"version {version} of {mount}/data/{_clean_path(path)} does not exist")
        return self._stored(read, mount, path, field)

    def promote(self, mount: str, path: str, field: str, secret: Secret, provider_key_id: str | None,
                expected_version: int | None) -> int:
        """Write ``secret`` as the newest version, only if the current version is ``expected_version``
        (None: only if the path does not exist). Other fields at the path are carried over.

        Idempotent: if the check-and-set fails because the newest version already holds exactly this
        secret and key id (a re-run after a crash), that version is returned.
        """
        path = _clean_path(path)
        if expected_version is None:
            data: dict[str, str] = {}
            cas = 0
        else:
            base = self._read(mount, path, expected_version)
            if base is None or base.data is None:
                # Either it was never there, or the expected version has since been deleted: the
                # write below fails check-and-set unless the path is still at that version.
                data = {}
            else:
                data = {k: v for k, v in base.data.items() if k != KEY_ID_FIELD and isinstance(v, str)}
            cas = expected_version
        data[field] = secret.reveal()
        if provider_key_id:
            data[KEY_ID_FIELD] = provider_key_id
        try:
            version = self._write(mount, path, data, cas, "promote")
        except VaultCheckAndSetMismatch:
            latest = self._read(mount, path, None)
            if latest is not None and latest.data is not None and latest.data.get(field) == data[field] \
                    and latest.data.get(KEY_ID_FIELD) == data.get(KEY_ID_FIELD):
                log.info("vault.promote_already_done", mount=mount, path=path, version=latest.version,
                         fingerprint=secret.fingerprint)
                return latest.version
            raise
        log.info("vault.promoted", mount=mount, path=path, version=version, expected_version=expected_version,
                 fingerprint=secret.fingerprint, provider_key_id=provider_key_id)
        return version

    def restore(self, mount: str, path: str, from_version: int, expected_version: int) -> int:
        """Write version ``from_version``'s data as the newest version (check-and-set on
        ``expected_version``). Idempotent like ``promote``."""
        path = _clean_path(path)
        old = self._read(mount, path, from_version)
        if old is None:
            raise VaultNotFound(f"cannot restore {mount}/data/{path}: version {from_version} does not exist")
        if old.data is None:
            raise VaultNotFound(
                f"cannot restore {mount}/data/{path}: version {from_version} is "
                f"{'destroyed' if old.destroyed else 'deleted'}; undelete it first (KV v2 undelete) if it was soft-deleted")
        try:
            version = self._write(mount, path, old.data, expected_version, "restore")
        except VaultCheckAndSetMismatch:
            latest = self._read(mount, path, None)
            if latest is not None and latest.version > from_version and latest.data == old.data:
                log.info("vault.restore_already_done", mount=mount, path=path, version=latest.version,
                         from_version=from_version)
                return latest.version
            raise
        log.info("vault.restored", mount=mount, path=path, version=version, from_version=from_version)
        return version

    def list_versions(self, mount: str, path: str) -> list[VersionInfo]:
        """All versions Vault still knows (oldest first); [] when the path does not exist."""
        meta = self._metadata(mount, path)
        if meta is None:
            return []
        current = meta.get("current_version")
        versions = meta.get("versions")
        if not isinstance(versions, dict):
            raise garbage_response(Operation("read metadata", mount, "metadata", path), "no 'versions' map")
        out = []
        for number, info in versions.items():
            info = info if isinstance(info, dict) else {}
            out.append(VersionInfo(version=int(number), created_at=_parse_time(info.get("created_time")),
                                   deleted_at=_parse_time(info.get("deletion_time")),
                                   destroyed=bool(info.get("destroyed")), current=int(number) == current))
        return sorted(out, key=lambda v: v.version)

    def custom_metadata(self, mount: str, path: str) -> dict[str, str]:
        meta = self._metadata(mount, path)
        values = (meta or {}).get("custom_metadata") or {}
        return {str(k): str(v) for k, v in values.items()} if isinstance(values, dict) else {}

    def set_custom_metadata(self, mount: str, path: str, values: dict[str, str]) -> None:
        """Merge ``values`` into the path's custom metadata (other keys are kept).

        hvac's ``update_metadata`` sends ``delete_version_after="0s"`` unless told otherwise, which
        would silently switch off an operator's auto-deletion; we pass the current value back.
        """
        path = _clean_path(path)
        new = _as_str_map(values, f"custom metadata for {mount}/metadata/{path}")
        meta = self._metadata(mount, path) or {}
        existing = meta.get("custom_metadata") if isinstance(meta.get("custom_metadata"), dict) else {}
        merged = {**{str(k): str(v) for k, v in (existing or {}).items()}, **new}
        keep_dva = meta.get("delete_version_after") or "0s"
        op = Operation("write metadata", mount, "metadata", path, ("create", "update"))
        self._call(op, lambda c: c.secrets.kv.v2.update_metadata(
            path=path, mount_point=mount, custom_metadata=merged, delete_version_after=str(keep_dva)))

    def write(self, mount: str, path: str, data: dict[str, str], cas: int | None = None) -> int:
        """Write ``data`` as a new version (check-and-set when ``cas`` is given); returns the version."""
        path = _clean_path(path)
        return self._write(mount, path, _as_str_map(data, f"data for {mount}/data/{path}"), cas, "write")

    def read_field(self, mount: str, path: str, field: str) -> Secret:
        """One field of the newest version, for secret references (``mount/path#field``)."""
        read = self._read(mount, path, None)
        if read is None:
            raise VaultNotFound(f"{mount}/data/{_clean_path(path)} does not exist: write the secret there, or fix "
                                "the reference (MOUNT/PATH#FIELD)")
        return self._stored(read, mount, path, field).secret

    # ------------------------------------------------------------------ staging
    def staging_path(self, run_id: str) -> str:
        if not _RUN_ID.match(run_id) or ".." in run_id:
            raise VaultInvalidRequest(f"invalid run id {run_id!r} for a staging path")
        return f"{self.staging_prefix}/{run_id}"

    def stage_pending(self, run_id: str, secret: Secret, provider_key_id: str | None,
                      expires_at: datetime | None = None) -> None:
        """Stage an issued key for ``run_id``; its provider expiry travels with it, so a step that
        recovers the key after a crash still knows when it expires (``pending_expiry``)."""
        data = {_STAGING_SECRET: secret.reveal()}
        if provider_key_id:
            data[_STAGING_KEY_ID] = provider_key_id
        if expires_at is not None:
            data[_STAGING_EXPIRES_AT] = expires_at.astimezone(timezone.utc).isoformat()
        version = self._write(self.staging_mount, self.staging_path(run_id), data, None, "stage")
        log.info("vault.staged", run_id=run_id, version=version, fingerprint=secret.fingerprint,
                 provider_key_id=provider_key_id)

    def read_pending(self, run_id: str) -> tuple[Secret, str | None]:
        path = self.staging_path(run_id)
        read = self._read(self.staging_mount, path, None)
        if read is None:
            raise VaultNotFound(f"no staged key for run {run_id} at {self.staging_mount}/data/{path}: it was never "
                                "staged or was already discarded")
        stored = self._stored(read, self.staging_mount, path, _STAGING_SECRET)
        key_id = read.data.get(_STAGING_KEY_ID) if read.data else None
        return stored.secret, key_id if isinstance(key_id, str) and key_id else None

    def pending_expiry(self, run_id: str) -> datetime | None:
        """The provider expiry staged with a run's key (``None``: none was given, or nothing staged)."""
        read = self._read(self.staging_mount, self.staging_path(run_id), None)
        raw = read.data.get(_STAGING_EXPIRES_AT) if read is not None and read.data else None
        try:
            return datetime.fromisoformat(raw) if isinstance(raw, str) else None
        except ValueError:  # written by something else: treat as unknown rather than fail the step
            return None

    def discard_pending(self, run_id: str) -> None:
        """Remove the staged key and every version of it (KV v2 metadata delete). Idempotent."""
        self._destroy_all("discard", self.staging_path(run_id))
        log.info("vault.discarded", run_id=run_id)

    def _destroy_all(self, what: str, path: str) -> None:
        """Delete ``path`` on the staging mount with every version and its metadata; absent is fine."""
        op = Operation(what, self.staging_mount, "metadata", path, ("delete",))
        try:
            self._call(op, lambda c: c.secrets.kv.v2.delete_metadata_and_all_versions(
                path=path, mount_point=self.staging_mount))
        except VaultNotFound:
            pass

    # ------------------------------------------------------------------ owners' deposits
    def deposit_path(self, key_name: str) -> str:
        """Where the owner of ``key_name`` writes its new credential (on the staging mount)."""
        return f"{self.deposit_prefix}/{key_slug(key_name)}"

    def read_deposit(self, key_name: str) -> Deposit | None:
        """The newest deposit for ``key_name``; ``None`` when there is none (absent, deleted, or
        without a non-empty ``credential`` field — a malformed write is treated as no deposit)."""
        path = self.deposit_path(key_name)
        read = self._read(self.staging_mount, path, None)
        if read is None or read.data is None:
            return None
        value = read.data.get(DEPOSIT_FIELD)
        if not isinstance(value, str) or not value.strip():
            return None
        claimed = read.data.get(DEPOSIT_BY_FIELD)
        created = next((v.created_at for v in self.list_versions(self.staging_mount, path) if v.version == read.version),
                       None)
        return Deposit(Secret(value.strip()), claimed.strip()[:200] if isinstance(claimed, str) and claimed.strip() else None,
                       read.version, created)

    def destroy_deposit(self, key_name: str) -> None:
        """Delete a deposit with every version and its metadata (nothing of it stays). Idempotent."""
        self._destroy_all("destroy deposit", self.deposit_path(key_name))
        log.info("vault.deposit_destroyed", key=key_name)

    # ------------------------------------------------------------------ health
    def health(self) -> VaultHealth:
        """One look at ``sys/health`` and at the token (``lookup-self``); never raises."""
        try:
            answer = self._client.adapter.get("/v1/sys/health", raise_exception=False)
        except requests.RequestException as exc:
            err = map_transport_error(exc, Operation("check health", path="sys/health"), self._addr)
            return VaultHealth(reachable=False, detail=str(err))
        body: Any = answer
        status = 200
        if isinstance(answer, requests.Response):
            status = answer.status_code
            try:
                body = answer.json()
            except ValueError:
                return VaultHealth(reachable=True, detail=f"sys/health answered {status} without JSON")
        if not isinstance(body, dict):
            return VaultHealth(reachable=True, detail=f"sys/health answered {status} with unexpected JSON")
        health = VaultHealth(reachable=True, initialized=bool(body.get("initialized")), sealed=bool(body.get("sealed")),
                             standby=bool(body.get("standby")), version=body.get("version"),
                             detail=f"sys/health {status}")
        if not health.initialized or health.sealed:
            return health
        try:
            self._call(Operation("look up the token", "auth", "token", "lookup-self", ("read",)),
                       lambda c: c.auth.token.lookup_self())
            token_valid, detail = True, health.detail
        except VaultPermissionDenied as exc:
            token_valid, detail = False, str(exc)
        except VaultError as exc:
            token_valid, detail = None, str(exc)
        return VaultHealth(reachable=True, initialized=health.initialized, sealed=health.sealed,
                           standby=health.standby, version=health.version, token_valid=token_valid, detail=detail)

    # ------------------------------------------------------------------ internals
    def _call(self, op: Operation, fn: Callable[[hvac.Client], T]) -> T:
        recovered = False

        def attempt() -> T:
            nonlocal recovered
            self._auth.prepare(self._client, self._addr)
            err: VaultError
            try:
                self.requests += 1
                return fn(self._client)
            except hvac_exc.VaultError as exc:
                err = map_hvac_error(exc, op)
            except requests.RequestException as exc:
                err = map_transport_error(exc, op, self._addr)
            # Raised outside the except blocks so the hvac exception (with the raw body) is not chained.
            if isinstance(err, VaultPermissionDenied) and not recovered:
                recovered = True
                if self._auth.recover(self._client, self._addr):
                    return attempt()
            raise err

        def on_retry(n: int, exc: BaseException, delay: float) -> None:
            log.warning("vault.retry", op=op.verb, where=op.where, attempt=n, delay_s=round(delay, 3),
                        error=str(exc), status=getattr(exc, "status", None))

        return retry_call(attempt, attempts=self._attempts, base_delay=self._base_delay, max_delay=self._max_delay,
                          retry_on=(VaultUnavailable,), sleep=self._sleep, on_retry=on_retry)

    def _read(self, mount: str, path: str, version: int | None) -> _Read | None:
        """Read a version (newest when None). None: path/version absent. ``data`` None: deleted/destroyed."""
        path = _clean_path(path)
        memo = _memo_versions()
        if memo is not None and version is not None:
            known = memo.get((self._addr, mount, path, version))
            if known is not None:
                return known
        op = Operation("read" if version is None else f"read version {version} of", mount, "data", path, ("read",))

        def fn(c: hvac.Client) -> Any:
            try:
                return c.secrets.kv.v2.read_secret_version(path=path, version=version, mount_point=mount,
                                                           raise_on_deleted_version=True)
            except hvac_exc.InvalidPath as exc:
                body = exc.json if isinstance(exc.json, dict) else {}
                data = body.get("data")
                inner = data if isinstance(data, dict) else {}
                if isinstance(inner.get("metadata"), dict):
                    return {"data": {"data": None, "metadata": inner["metadata"]}}  # deleted or destroyed
                if exc.errors:  # e.g. "no handler for route": the mount does not exist
                    raise
                return None

        response = self._call(op, fn)
        if response is None:
            return None
        try:
            inner = response["data"]
            meta = inner["metadata"]
            data = inner["data"]
            number = int(meta["version"])
        except (KeyError, TypeError, ValueError):
            raise garbage_response(op, "no data/metadata/version in the answer") from None
        if data is not None and not isinstance(data, dict):
            raise garbage_response(op, "'data' is not an object")
        read = _Read(data=data, version=number, deleted_at=str(meta.get("deletion_time") or ""),
                     destroyed=bool(meta.get("destroyed")))
        if memo is not None and data is not None:
            memo[(self._addr, mount, path, number)] = read
        return read

    def _stored(self, read: _Read, mount: str, path: str, field: str) -> StoredSecret:
        where = f"{mount}/data/{_clean_path(path)}"
        if read.data is None:
            state = "destroyed" if read.destroyed else f"deleted at {read.deleted_at}"
            raise VaultNotFound(f"version {read.version} of {where} is {state}; undelete it (KV v2 undelete) or "
                                "write a new version")
        value = read.data.get(field)
        if value is None:
            fields = ", ".join(sorted(read.data)) or "none"
            raise VaultNotFound(f"field {field!r} is missing at {where} version {read.version} (fields present: "
                                f"{fields}): fix the key's vault field or write it there")
        if not isinstance(value, str) or not value:
            raise VaultInvalidRequest(f"field {field!r} at {where} version {read.version} is not a non-empty string")
        key_id = read.data.get(KEY_ID_FIELD)
        return StoredSecret(Secret(value), read.version, key_id if isinstance(key_id, str) and key_id else None)

    def _write(self, mount: str, path: str, data: dict[str, str], cas: int | None, why: str) -> int:
        if not data:
            raise VaultInvalidRequest(f"refusing to write empty data to {mount}/data/{path}")
        op = Operation("write" if cas is None else f"write (check-and-set on version {cas})", mount, "data", path,
                       ("create", "update"))
        response = self._call(op, lambda c: c.secrets.kv.v2.create_or_update_secret(
            path=path, secret=data, cas=cas, mount_point=mount))
        try:
            return int(response["data"]["version"])
        except (KeyError, TypeError, ValueError):
            raise garbage_response(op, f"no version in the answer to {why}") from None

    def _metadata(self, mount: str, path: str) -> dict[str, Any] | None:
        path = _clean_path(path)
        op = Operation("read metadata", mount, "metadata", path, ("read",))

        def fn(c: hvac.Client) -> Any:
            try:
                return c.secrets.kv.v2.read_secret_metadata(path=path, mount_point=mount)
            except hvac_exc.InvalidPath as exc:
                if exc.errors:
                    raise
                return None

        response = self._call(op, fn)
        if response is None:
            return None
        if not isinstance(response, dict) or not isinstance(response.get("data"), dict):
            raise garbage_response(op, "no 'data' in the metadata answer")
        return response["data"]
