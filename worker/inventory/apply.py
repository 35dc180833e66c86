"""Sync an :class:`Inventory` into the database, idempotently.

- Providers and integrations are upserted with their validated spec as JSON (references only:
  the schema refuses literal secrets, so the JSON never holds one).
- Keys are upserted with their resolved policy in the columns, then their ``next_due_at`` is
  recomputed (``worker.service.due``).
- A key's ``expires_at`` and ``credential_type`` are also changed by rotations (a new credential
  has a new expiry; a deprecated type is replaced). Re-applying an unchanged file must not undo
  that, so those two are written only for a new key or when the *declaration* changed since the
  last applied inventory (the newest ``inventory_snapshot``).
- Nothing is deleted without ``prune``; with it, keys that have an open run are refused (the
  whole apply is, so it never half-happens).
- The normalised document is stored as a snapshot when its digest changed; every change to a
  declaration is an audit event with the actor.
"""

from __future__ import annotations

import getpass
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable, Literal

from sqlalchemy import delete, func
from sqlmodel import col, select, Session

from worker.service.due import refresh_next_due
from worker.clock import as_utc, utcnow
from worker.db.models import (
    AuditEvent,
    IntegrationRecord,
    InventorySnapshot,
    KeyVersion,
    ManagedKey,
    ProviderRecord,
    RotationRun,
    SinkDelivery,
)
from worker.errors import ConfigError
from worker.inventory.schema import Inventory, KeySpec
from worker.inventory.snapshot import key_notice, snapshot_settings

Kind = Literal["provider", "integration", "key"]
KINDS: tuple[Kind, ...] = ("provider", "integration", "key")
ACTIONS = ("created", "updated", "unchanged", "removed")


class PruneBlocked(ConfigError):
    """``--prune`` would remove keys that have a rotation in progress."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys
        super().__init__(
            "cannot prune keys with an open rotation run: " + ", ".join(keys)
            + "; wait for the runs to finish (or cancel them), or keep the keys in the inventory"
        )


@dataclass
class ApplyReport:
    """What an apply did (or, with ``dry_run``, would do)."""

    dry_run: bool = False
    changes: dict[str, dict[str, list[str]]] = field(
        default_factory=lambda: {kind: {action: [] for action in ACTIONS} for kind in KINDS}
    )
    would_prune: dict[str, list[str]] = field(default_factory=lambda: {kind: [] for kind in KINDS})
    updated_fields: dict[str, list[str]] = field(default_factory=dict)   # "key:NAME" → changed fields
    due_refreshed: list[str] = field(default_factory=list)
    snapshot_stored: bool = False
    digest: str = ""

    def note(self, kind: Kind, action: str, name: str) -> None:
        self.changes[kind][action].append(name)

    @property
    def changed(self) -> bool:
        return self.snapshot_stored or any(
            self.changes[kind][action] for kind in KINDS for action in ("created", "updated", "removed")
        ) or bool(self.due_refreshed)

    def counts(self) -> dict[str, dict[str, int]]:
        return {kind: {action: len(names) for action, names in actions.items()} for kind, actions in self.changes.items()}

    def summary_lines(self) -> list[str]:
        lines = []
        for kind in KINDS:
            counts = self.counts()[kind]
            lines.append(f"{kind}s: " + ", ".join(f"{counts[a]} {a}" for a in ACTIONS))
        for kind in KINDS:
            if self.would_prune[kind]:
                lines.append(f"not in the file ({kind}s), kept; --prune removes them: " + ", ".join(sorted(self.would_prune[kind])))
        if not self.changed:
            lines.append("nothing changed: the database already matches the inventory")
        elif self.dry_run:
            lines.append("dry run: nothing was written")
        return lines

    def as_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "changed": self.changed,
            "counts": self.counts(),
            "changes": self.changes,
            "updated_fields": self.updated_fields,
            "would_prune": self.would_prune,
            "due_refreshed": self.due_refreshed,
            "snapshot_stored": self.snapshot_stored,
            "digest": self.digest,
        }


def default_actor() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        user = "unknown"
    return f"cli:{user}"


def normalised_document(inventory: Inventory) -> dict[str, Any]:
    return inventory.model_dump(mode="json", by_alias=True)


def document_digest(document: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(document, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def latest_snapshot(session: Session) -> InventorySnapshot | None:
    return session.exec(select(InventorySnapshot).order_by(col(InventorySnapshot.id).desc()).limit(1)).first()


def apply_inventory(
    session: Session,
    inventory: Inventory,
    *,
    prune: bool = False,
    dry_run: bool = False,
    actor: str | None = None,
    source: str | None = None,
    now: datetime | None = None,
) -> ApplyReport:
    """Bring the database in line with ``inventory``; the caller commits (or not, for a dry run)."""
    now = now or utcnow()
    actor = actor or default_actor()
    document = normalised_document(inventory)
    report = ApplyReport(dry_run=dry_run, digest=document_digest(document))
    previous = latest_snapshot(session)
    previous_keys: dict[str, Any] = (previous.document.get("keys") or {}) if previous else {}

    existing_keys = {k.name: k for k in session.exec(select(ManagedKey)).all()}
    stale_keys = sorted(set(existing_keys) - set(inventory.keys))
    if prune and stale_keys:
        _refuse_open_runs(session, [existing_keys[n] for n in stale_keys])

    audit: list[AuditEvent] = []

    def record(event: str, *, key_id: int | None = None, detail: dict[str, Any]) -> None:
        audit.append(AuditEvent(at=now, actor=actor, event=event, key_id=key_id, detail=detail))

    # Providers first: keys reference them.
    existing_providers = {p.name: p for p in session.exec(select(ProviderRecord)).all()}
    for name, provider_spec in inventory.providers.items():
        provider_columns: dict[str, Any] = {"kind": provider_spec.kind, "mode": provider_spec.mode,
                                            "spec": provider_spec.model_dump(mode="json", by_alias=True)}
        _upsert_record(session, report, "provider", ProviderRecord, existing_providers.get(name), name, provider_columns,
                       now, dry_run, record)

    existing_integrations = {i.name: i for i in session.exec(select(IntegrationRecord)).all()}
    for name, integration_spec in inventory.integrations.items():
        integration_columns: dict[str, Any] = {"kind": integration_spec.kind,
                                               "spec": integration_spec.model_dump(mode="json", by_alias=True)}
        _upsert_record(session, report, "integration", IntegrationRecord, existing_integrations.get(name), name,
                       integration_columns, now, dry_run, record)

    if not dry_run:
        session.flush()

    for name, spec in inventory.keys.items():
        row = existing_keys.get(name)
        wanted = _key_columns(inventory, spec)
        declared_before = previous_keys.get(name)
        declared_now = document["keys"][name]
        notice = key_notice(declared_now)
        if row is None:
            report.note("key", "created", name)
            if not dry_run:
                row = ManagedKey(name=name, created_at=now, updated_at=now, **wanted, **notice)
                session.add(row)
                session.flush()
                record("key_declared", key_id=row.id, detail={"key": name, "values": _auditable(wanted)})
            continue
        if declared_before is not None:
            # Rotations move these on; only a changed declaration overrides the live value.
            for column, spec_field in (("expires_at", "expires_at"), ("credential_type", "credential_type")):
                if declared_before.get(spec_field) == declared_now.get(spec_field):
                    wanted.pop(column)
        if not dry_run:
            _copy_notice(session, row, notice)
        changed = {column: (_jsonable(getattr(row, column)), _jsonable(val)) for column, val in wanted.items()
                   if not _same(getattr(row, column), val)}
        if not changed:
            report.note("key", "unchanged", name)
            continue
        report.note("key", "updated", name)
        report.updated_fields[f"key:{name}"] = sorted(changed)
        if not dry_run:
            for col, val in wanted.items():
                setattr(row, col, val)
            row.updated_at = now
            session.add(row)
            record("key_updated", key_id=row.id, detail={"key": name, "changed": {c: {"from": a, "to": b} for c, (a, b) in changed.items()}})

    # Removals (keys before providers: a key references its provider).
    removals: tuple[tuple[Kind, list[str]], ...] = (
        ("key", stale_keys),
        ("integration", sorted(set(existing_integrations) - set(inventory.integrations))),
        ("provider", sorted(set(existing_providers) - set(inventory.providers))),
    )
    for kind, stale in removals:
        for name in stale:
            if not prune:
                report.would_prune[kind].append(name)
                continue
            report.note(kind, "removed", name)
            if dry_run:
                continue
            if kind == "key":
                key = existing_keys[name]
                _delete_key(session, key)
                record("key_removed", key_id=key.id, detail={"key": name})
            elif kind == "integration":
                session.delete(existing_integrations[name])
                record("integration_removed", detail={"integration": name})
            else:
                if _provider_in_use(session, name):
                    raise ConfigError(f"cannot prune provider {name!r}: keys in the database still use it")
                session.delete(existing_providers[name])
                record("provider_removed", detail={"provider": name})
        if not dry_run:
            session.flush()

    if not dry_run:
        for key in session.exec(select(ManagedKey)).all():
            if key.name in inventory.keys and refresh_next_due(session, key, now):
                report.due_refreshed.append(key.name)

    if previous is None or previous.digest != report.digest:
        report.snapshot_stored = True
        if not dry_run:
            session.add(InventorySnapshot(applied_at=now, applied_by=actor, digest=report.digest, source=source, document=document,
                                          settings=snapshot_settings(document)))
            record("inventory_applied", detail={"digest": report.digest, "source": source, "counts": report.counts()})

    if not dry_run:
        session.add_all(audit)
        session.flush()
    return report


def _upsert_record(session: Session, report: ApplyReport, kind: Kind, model: Any, row: Any, name: str,
                   wanted: dict[str, Any], now: datetime, dry_run: bool, record: Any) -> None:
    if row is None:
        report.note(kind, "created", name)
        if not dry_run:
            session.add(model(name=name, updated_at=now, **wanted))
            record(f"{kind}_declared", detail={kind: name})
        return
    changed = sorted(col for col, val in wanted.items() if getattr(row, col) != val)
    if not changed:
        report.note(kind, "unchanged", name)
        return
    report.note(kind, "updated", name)
    report.updated_fields[f"{kind}:{name}"] = changed
    if not dry_run:
        for col, val in wanted.items():
            setattr(row, col, val)
        row.updated_at = now
        session.add(row)
        record(f"{kind}_updated", detail={kind: name, "changed": changed})


def _key_columns(inventory: Inventory, spec: KeySpec) -> dict[str, Any]:
    policy = inventory.policy_for(spec)
    return {
        "provider": spec.provider,
        "credential_type": spec.credential_type,
        "owner": spec.owner,
        "vault_mount": spec.vault.mount,
        "vault_path": spec.vault.path,
        "vault_field": spec.vault.field,
        "expiry_lead_time_s": int(policy.expiry_lead_time.total_seconds()),
        "max_age_s": int(policy.max_age.total_seconds()) if policy.max_age is not None else None,
        "grace_period_s": int(policy.grace_period.total_seconds()),
        "integrations": list(spec.integrations),
        "labels": dict(spec.labels),
        "enabled": spec.enabled,
        "expires_at": spec.expires_at,
    }


def _copy_notice(session: Session, row: ManagedKey, notice: dict[str, Any]) -> None:
    """Keep the key's copy of its contact and assisted timings in line with the document; like
    the document, a change to them is recorded by the snapshot, not as a key update."""
    if any(getattr(row, column) != value for column, value in notice.items()):
        for column, value in notice.items():
            setattr(row, column, value)
        session.add(row)


def _same(current: Any, wanted: Any) -> bool:
    if isinstance(current, datetime) or isinstance(wanted, datetime):
        return as_utc(current) == as_utc(wanted)
    return bool(current == wanted)


def _jsonable(value: Any) -> Any:
    return as_utc(value).isoformat() if isinstance(value, datetime) else value


def _auditable(values: dict[str, Any]) -> dict[str, Any]:
    return {k: _jsonable(v) for k, v in values.items()}


def _refuse_open_runs(session: Session, keys: Iterable[ManagedKey]) -> None:
    by_id = {k.id: k.name for k in keys}
    if not by_id:
        return
    open_ids = session.exec(
        select(col(RotationRun.key_id)).where(col(RotationRun.key_id).in_(list(by_id)), col(RotationRun.finished_at).is_(None))
    ).all()
    if open_ids:
        raise PruneBlocked(sorted({by_id[i] for i in open_ids}))


def _delete_key(session: Session, key: ManagedKey) -> None:
    """Remove a key and its finished history (the audit trail keeps the record of it)."""
    run_ids = select(RotationRun.id).where(RotationRun.key_id == key.id)
    session.exec(delete(SinkDelivery).where(col(SinkDelivery.run_id).in_(run_ids)))
    session.exec(delete(RotationRun).where(col(RotationRun.key_id) == key.id))
    session.exec(delete(KeyVersion).where(col(KeyVersion.key_id) == key.id))
    session.delete(key)


def _provider_in_use(session: Session, provider: str) -> bool:
    return bool(session.exec(select(func.count()).select_from(ManagedKey).where(ManagedKey.provider == provider)).one())
