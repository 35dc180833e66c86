"""In-memory fakes implementing the VaultStore / Provider / Integration contracts, and helpers
to build a PipelineContext and a managed key on a test database. For pipeline unit tests only;
integration tests use the real VaultStore against a real OpenBao server."""

from __future__ import annotations

import secrets as pysecrets
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Optional

from sqlmodel import Session

from worker.clock import set_clock
from worker.db.models import ManagedKey, ProviderRecord
from worker.db.session import make_engine, session_scope
from worker.errors import DeprecatedCredential, PermanentError
from worker.integrations.base import Announcement, VerifyResult, VerifyStatus
from worker.pipeline.context import PipelineContext, StepPolicy
from worker.protocol.states import Mode
from worker.providers.base import CheckOutcome, IssuedCredential, ProviderKeyInfo, RevokeOutcome
from worker.secret import Secret
from worker.vault.errors import VaultCheckAndSetMismatch, VaultNotFound
from worker.vault.store import KEY_ID_FIELD, StoredSecret


class FakeClock:
    def __init__(self, start: Optional[datetime] = None) -> None:
        self.now = start or datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += timedelta(seconds=seconds)

    def install(self) -> "FakeClock":
        set_clock(self)
        return self


class Faults:
    """Scripted failures: ``faults.add("issue", exc, times=2)`` raises on the next 2 calls."""

    def __init__(self) -> None:
        self._script: dict[str, list[BaseException]] = {}
        self._lock = threading.Lock()

    def add(self, call: str, exc: BaseException, times: int = 1) -> None:
        with self._lock:
            self._script.setdefault(call, []).extend([exc] * times)

    def always(self, call: str, exc: BaseException) -> None:
        self.add(call, exc, times=10_000)

    def clear(self, call: str) -> None:
        with self._lock:
            self._script.pop(call, None)

    def hit(self, call: str) -> None:
        with self._lock:
            queue = self._script.get(call)
            exc = queue.pop(0) if queue else None
        if exc is not None:
            raise exc


class FakeVault:
    """KV v2 semantics that matter here: versions, check-and-set, staging per run."""

    def __init__(self) -> None:
        self.paths: dict[tuple[str, str], list[dict[str, str]]] = {}
        self.staging: dict[str, tuple[str, Optional[str]]] = {}
        self.staged_expiry: dict[str, Optional[datetime]] = {}
        self.faults = Faults()
        self.lock = threading.Lock()

    # seeding / inspection
    def seed(self, mount: str, path: str, field: str, value: str, key_id: Optional[str]) -> int:
        data = {field: value}
        if key_id:
            data[KEY_ID_FIELD] = key_id
        self.paths.setdefault((mount, path), []).append(data)
        return len(self.paths[(mount, path)])

    def current_value(self, mount: str, path: str, field: str) -> Optional[str]:
        versions = self.paths.get((mount, path))
        return versions[-1].get(field) if versions else None

    def all_values(self) -> list[str]:
        out = [v for versions in self.paths.values() for d in versions for v in d.values()]
        return out + [s for s, _ in self.staging.values()]

    # contract
    def read_current(self, mount: str, path: str, field: str) -> Optional[StoredSecret]:
        self.faults.hit("read_current")
        versions = self.paths.get((mount, path))
        if not versions:
            return None
        data = versions[-1]
        return StoredSecret(Secret(data[field]), len(versions), data.get(KEY_ID_FIELD))

    def read_version(self, mount: str, path: str, field: str, version: int) -> StoredSecret:
        self.faults.hit("read_version")
        versions = self.paths.get((mount, path)) or []
        if not 1 <= version <= len(versions):
            raise VaultNotFound(f"version {version} of {mount}/{path} does not exist")
        data = versions[version - 1]
        return StoredSecret(Secret(data[field]), version, data.get(KEY_ID_FIELD))

    def stage_pending(self, run_id: str, secret: Secret, provider_key_id: Optional[str],
                      expires_at: Optional[datetime] = None) -> None:
        self.faults.hit("stage_pending")
        self.staging[run_id] = (secret.reveal(), provider_key_id)
        self.staged_expiry[run_id] = expires_at

    def pending_expiry(self, run_id: str) -> Optional[datetime]:
        return self.staged_expiry.get(run_id) if run_id in self.staging else None

    def read_pending(self, run_id: str) -> tuple[Secret, Optional[str]]:
        self.faults.hit("read_pending")
        if run_id not in self.staging:
            raise VaultNotFound(f"no staged key for run {run_id}")
        value, key_id = self.staging[run_id]
        return Secret(value), key_id

    def discard_pending(self, run_id: str) -> None:
        self.faults.hit("discard_pending")
        self.staging.pop(run_id, None)

    # owners' deposits (assisted mode)
    staging_mount = "secret"

    def deposit_path(self, key_name: str) -> str:
        return "keyrotor/deposits/" + key_name.replace("/", "-")

    def read_deposit(self, key_name: str) -> Any:
        return getattr(self, "deposits", {}).get(key_name)

    def read_field(self, mount: str, path: str, field: str) -> Secret:
        self.faults.hit("read_field")
        value = self.current_value(mount, path, field)
        if value is None:
            raise VaultNotFound(f"{mount}/{path}#{field} does not exist")
        return Secret(value)

    def destroy_deposit(self, key_name: str) -> None:
        getattr(self, "deposits", {}).pop(key_name, None)

    def promote(self, mount: str, path: str, field: str, secret: Secret, provider_key_id: Optional[str],
                expected_version: Optional[int]) -> int:
        self.faults.hit("promote")
        with self.lock:
            versions = self.paths.setdefault((mount, path), [])
            if len(versions) != (expected_version or 0):
                latest = versions[-1] if versions else {}
                if latest.get(field) == secret.reveal() and latest.get(KEY_ID_FIELD) == (provider_key_id or None):
                    return len(versions)  # like VaultStore.promote: an earlier attempt already wrote it
                raise VaultCheckAndSetMismatch(f"check-and-set: expected version {expected_version}, "
                                               f"found {len(versions)}")
            data = dict(versions[-1]) if versions else {}
            data[field] = secret.reveal()
            data.pop(KEY_ID_FIELD, None)
            if provider_key_id:
                data[KEY_ID_FIELD] = provider_key_id
            versions.append(data)
            self.faults.hit("after_promote")  # crash after the write, before the caller records it
            return len(versions)

    def restore(self, mount: str, path: str, from_version: int, expected_version: int) -> int:
        self.faults.hit("restore")
        with self.lock:
            versions = self.paths[(mount, path)]
            if len(versions) != expected_version:
                raise VaultCheckAndSetMismatch("check-and-set mismatch on restore")
            versions.append(dict(versions[from_version - 1]))
            return len(versions)


@dataclass
class FakeKey:
    key_id: str
    name: str
    secret: str
    valid: bool = True
    checks_until_live: int = 0
    credential_type: str = "api_key"


class FakeProvider:
    """A provider API: issue/check/revoke/list with scripted faults and an ordered call log."""

    def __init__(self, name: str = "acme", mode: str = "overlap", *, can_list: bool = True,
                 can_revoke: bool = True, activation_checks: int = 0) -> None:
        self.name = name
        self.mode = Mode(mode)
        self.can_issue = mode != "assisted"
        self.can_revoke = can_revoke
        self.can_list = can_list
        self.keys: dict[str, FakeKey] = {}
        self.faults = Faults()
        self.calls: list[tuple[str, Optional[str]]] = []
        self.activation_checks = activation_checks
        self.issued_secrets: list[str] = []
        #: Types the provider answers 434 for: issuing refused, checks say ``deprecated``.
        self.deprecated_types: set[str] = set()
        #: Keys (ids) whose own calls the provider rejects as deprecated (a legacy key format).
        self.deprecated_keys: set[str] = set()
        #: Revoking these keys authenticates with the key itself, which is rejected as deprecated.
        self.revoke_refused_deprecated: set[str] = set()
        #: Expiry the provider gives each new key (None: keys do not expire).
        self.key_lifetime: Optional[timedelta] = None
        self.lock = threading.Lock()

    def add_existing(self, name: str = "initial") -> FakeKey:
        key = FakeKey(key_id=f"k-{len(self.keys) + 1}", name=name, secret="sk_old_" + pysecrets.token_hex(16))
        self.keys[key.key_id] = key
        return key

    def _find(self, secret: str) -> Optional[FakeKey]:
        return next((k for k in self.keys.values() if k.secret == secret), None)

    def issue(self, *, name: str, credential_type: str, labels: dict[str, str]) -> IssuedCredential:
        self.faults.hit("issue")
        if credential_type in self.deprecated_types:
            self.calls.append(("issue", None))
            raise DeprecatedCredential(f"434: new {credential_type} credentials can no longer be created")
        with self.lock:
            key = FakeKey(key_id=f"k-{len(self.keys) + 1}", name=name, secret="sk_live_" + pysecrets.token_hex(16),
                          checks_until_live=self.activation_checks, credential_type=credential_type)
            if self.mode == Mode.cutover:
                for other in self.keys.values():
                    other.valid = False
            self.keys[key.key_id] = key
            self.issued_secrets.append(key.secret)
            self.calls.append(("issue", key.key_id))
        self.faults.hit("after_issue")
        expires_at = datetime.now(timezone.utc) + self.key_lifetime if self.key_lifetime is not None else None
        return IssuedCredential(secret=Secret(key.secret), key_id=key.key_id, name=name, expires_at=expires_at)

    def check(self, secret: Secret, *, credential_type: str) -> CheckOutcome:
        self.faults.hit("check")
        key = self._find(secret.reveal())
        self.calls.append(("check", key.key_id if key else None))
        if key is None or not key.valid:
            return CheckOutcome.invalid
        if key.credential_type in self.deprecated_types or key.key_id in self.deprecated_keys:
            return CheckOutcome.deprecated
        if key.checks_until_live > 0:
            key.checks_until_live -= 1
            return CheckOutcome.invalid
        return CheckOutcome.valid

    def revoke(self, *, key_id: Optional[str], secret: Optional[Secret], credential_type: str) -> RevokeOutcome:
        self.faults.hit("revoke")
        key = self.keys.get(key_id or "") or (self._find(secret.reveal()) if secret else None)
        if key is not None and key.key_id in self.revoke_refused_deprecated:
            self.calls.append(("revoke_refused", key.key_id))
            raise DeprecatedCredential("434: this credential type is deprecated")
        self.calls.append(("revoke", key.key_id if key else key_id))
        if key is None or not key.valid:
            return RevokeOutcome.already_gone
        key.valid = False
        return RevokeOutcome.revoked

    def list_keys(self) -> list[ProviderKeyInfo]:
        self.faults.hit("list")
        return [ProviderKeyInfo(key_id=k.key_id, name=k.name) for k in self.keys.values() if k.valid]

    def is_valid(self, secret: str) -> bool:
        key = self._find(secret)
        return bool(key and key.valid)

    def revoked_ids(self) -> list[Optional[str]]:
        return [kid for call, kid in self.calls if call == "revoke"]


class FakeIntegration:
    """A consumer that holds whatever secret it was last pushed and reports its fingerprint."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.held: Optional[str] = None
        self.events: list[tuple[str, str]] = []
        self.faults = Faults()
        self.report_stale = False

    def push(self, announcement: Announcement) -> None:
        self.faults.hit("push")
        self.held = announcement.secret.reveal()
        self.events.append((announcement.event, announcement.fingerprint))

    def verify(self, announcement: Announcement) -> VerifyResult:
        self.faults.hit("verify")
        from worker.secret import fingerprint

        reported = fingerprint(self.held) if self.held else None
        if self.report_stale or reported != announcement.fingerprint:
            return VerifyResult(VerifyStatus.mismatch, reported_fingerprint=reported)
        return VerifyResult(VerifyStatus.ok, reported_fingerprint=reported)


@dataclass
class World:
    """A database, fake Vault, provider and integrations, wired into a PipelineContext."""

    url: str
    provider: FakeProvider
    vault: FakeVault = field(default_factory=FakeVault)
    integrations: dict[str, FakeIntegration] = field(default_factory=dict)
    notifications: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    clock: FakeClock = field(default_factory=FakeClock)
    ctx: Optional[PipelineContext] = None
    key: Optional[ManagedKey] = None
    old: Optional[FakeKey] = None

    def build(self, *, key_name: str = "acme/reporting", grace_period_s: int = 3600, sinks: tuple[str, ...] = ("svc-a", "svc-b"),
              seed_old: bool = True, policy: Optional[StepPolicy] = None) -> "World":
        self.clock.install()
        engine = make_engine(self.url)
        for name in sinks:
            self.integrations[name] = FakeIntegration(name)
        with session_scope(engine) as session:
            session.add(ProviderRecord(name=self.provider.name, kind="http", mode=self.provider.mode.value,
                                       spec={"activation": {"poll_interval": "2s", "timeout": "60s"}}))
            session.flush()
            key = ManagedKey(name=key_name, provider=self.provider.name, credential_type="api_key", owner="team@example.com",
                             vault_mount="secret", vault_path=f"apps/{key_name}", vault_field="api_key",
                             grace_period_s=grace_period_s, integrations=list(sinks), labels={})
            session.add(key)
            session.flush()
            self.key = key
        if seed_old:
            self.old = self.provider.add_existing()
            self.vault.seed("secret", f"apps/{key_name}", "api_key", self.old.secret, self.old.key_id)
            for sink in self.integrations.values():
                sink.held = self.old.secret

        def provider_factory(_session: Session, _key: ManagedKey) -> FakeProvider:
            return self.provider

        def integration_factory(_session: Session, name: str) -> FakeIntegration:
            if name not in self.integrations:
                raise PermanentError(f"integration {name!r} is not in the applied inventory")
            return self.integrations[name]

        def notify(event: str, *, key_name: str, run_id: Optional[str], detail: dict[str, Any]) -> None:
            self.notifications.append((event, {"key": key_name, "run_id": run_id, **detail}))

        self.ctx = PipelineContext(engine=engine, vault=self.vault, provider_factory=provider_factory,
                                   integration_factory=integration_factory, notify=notify, actor="worker:test",
                                   policy=policy or StepPolicy(max_retries=3, min_backoff_ms=1000, max_backoff_ms=8000,
                                                               time_limit_ms=30_000, activation_poll_s=2,
                                                               activation_timeout_s=60, revocation_timeout_s=30))
        return self

    @property
    def engine(self) -> Any:
        assert self.ctx is not None
        return self.ctx.engine

    def request(self, **kwargs: Any) -> str:
        from worker.pipeline.requests import request_rotation

        assert self.key is not None
        with session_scope(self.engine) as session:
            run, _ = request_rotation(session, key_name=self.key.name, reason=kwargs.pop("reason", "manual"),
                                      trigger=kwargs.pop("trigger", "manual"), requested_by="tester", **kwargs)
            return run.id

    def drive(self, run_id: str, **kwargs: Any) -> Any:
        from worker.runtime.inline import drive

        assert self.ctx is not None
        return drive(self.ctx, run_id, advance=self.clock.advance, **kwargs)

    def vault_value(self) -> Optional[str]:
        assert self.key is not None
        return self.vault.current_value("secret", self.key.vault_path, "api_key")


def all_rows_text(engine: Any) -> str:
    """Every row of every table, as text (for the no-secret-anywhere check)."""
    import sqlalchemy as sa

    out = []
    with engine.connect() as conn:
        for table in sa.inspect(conn).get_table_names():
            for row in conn.execute(sa.text(f'SELECT * FROM "{table}"')):
                out.append(repr(tuple(row)))
    return "\n".join(out)


def states_in_audit(engine: Any, run_id: str) -> list[tuple[Optional[str], Optional[str]]]:
    from sqlmodel import select

    from worker.db.models import AuditEvent

    with Session(engine) as session:
        events = session.exec(select(AuditEvent).where(AuditEvent.run_id == run_id, AuditEvent.event == "state_changed")
                              .order_by(AuditEvent.id)).all()
        return [(e.from_state, e.to_state) for e in events]


Callback = Callable[[], None]
