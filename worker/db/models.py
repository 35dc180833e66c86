"""The tables. No column ever holds a secret value: only provider key ids and fingerprints.

- ``ManagedKey``: one row per credential keyrotor rotates, with an indexed ``next_due_at`` so the
  detection scan costs O(keys due).
- ``KeyVersion``: each credential issued or adopted for a key, with its stage.
- ``RotationRun``: one rotation attempt; its ``state`` is the record of where the protocol is.
  A partial unique index on ``key_id WHERE finished_at IS NULL`` lets the database guarantee at
  most one open run per key.
- ``SinkDelivery``: per-run status of each integration (propagate / verify / rollback).
- ``AuditEvent``: append-only trail (database triggers refuse UPDATE and DELETE).
- ``ProviderRecord`` / ``IntegrationRecord``: the inventory's declarations, as applied.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any, Optional, Protocol

from sqlalchemy import JSON, Column, DateTime, Index, String, Text, UniqueConstraint, text
from sqlmodel import Field, SQLModel

from worker.protocol.states import RunState  # the state column's values: the protocol owns them


def _ts(nullable: bool = True, index: bool = False) -> Any:
    return Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=nullable, index=index))


class _Row(Protocol):
    id: Optional[int]


def saved_id(row: _Row) -> int:
    """The id of a row read from (or flushed to) the database; the ORM types it optional only
    because a row built in memory has none until it is flushed."""
    if row.id is None:
        raise ValueError(f"{type(row).__name__} has no id: it was never flushed to the database")
    return row.id


class VersionStage(str, enum.Enum):
    pending = "pending"      # issued, staged in Vault, not yet served
    current = "current"      # what Vault serves at the key's path
    previous = "previous"    # superseded, still valid during the grace period
    retired = "retired"      # revoked at the provider (or invalidated by a cutover)
    failed = "failed"        # issued by a run that failed; revoked by compensation


class ProviderRecord(SQLModel, table=True):
    __tablename__ = "provider"

    name: str = Field(primary_key=True, max_length=128)
    kind: str = Field(max_length=32)
    mode: str = Field(default="overlap", max_length=16)
    spec: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    updated_at: Optional[datetime] = _ts()


class IntegrationRecord(SQLModel, table=True):
    __tablename__ = "integration"

    name: str = Field(primary_key=True, max_length=128)
    kind: str = Field(max_length=32)
    spec: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    updated_at: Optional[datetime] = _ts()


class ManagedKey(SQLModel, table=True):
    __tablename__ = "managed_key"

    id: Optional[int] = Field(default=None, primary_key=True)
    name: str = Field(sa_column=Column(String(200), unique=True, nullable=False))
    provider: str = Field(foreign_key="provider.name", index=True, max_length=128)
    credential_type: str = Field(max_length=64)
    owner: str = Field(max_length=200)
    vault_mount: str = Field(default="secret", max_length=200)
    vault_path: str = Field(max_length=500)
    vault_field: str = Field(default="api_key", max_length=100)
    expiry_lead_time_s: int = 7 * 86400
    max_age_s: Optional[int] = None
    grace_period_s: int = 3600
    integrations: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    labels: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    enabled: bool = True
    expires_at: Optional[datetime] = _ts()
    last_rotated_at: Optional[datetime] = _ts()
    next_due_at: Optional[datetime] = _ts(index=True)
    due_reason: Optional[str] = Field(default=None, max_length=32)
    created_at: Optional[datetime] = _ts()
    updated_at: Optional[datetime] = _ts()
    # The key's declared owner contact and assisted-mode timings, as in the applied document
    # (migration 0005): a notice for one key reads its row, not the whole inventory.
    contact: Optional[dict[str, Any]] = Field(default=None, sa_column=Column(JSON, nullable=True))
    assisted: Optional[dict[str, Any]] = Field(default=None, sa_column=Column(JSON, nullable=True))


class KeyVersion(SQLModel, table=True):
    __tablename__ = "key_version"
    __table_args__ = (Index("ix_key_version_key_stage", "key_id", "stage"),)

    id: Optional[int] = Field(default=None, primary_key=True)
    key_id: int = Field(foreign_key="managed_key.id")
    run_id: Optional[str] = Field(default=None, max_length=40, index=True)  # no FK: runs point at versions
    credential_type: str = Field(max_length=64)
    stage: VersionStage = Field(sa_column=Column(String(16), nullable=False))
    provider_key_id: Optional[str] = Field(default=None, max_length=200, index=True)
    provider_key_name: Optional[str] = Field(default=None, max_length=200)
    fingerprint: Optional[str] = Field(default=None, max_length=64)
    vault_version: Optional[int] = None
    issued_at: Optional[datetime] = _ts()
    expires_at: Optional[datetime] = _ts()
    promoted_at: Optional[datetime] = _ts()
    retired_at: Optional[datetime] = _ts()


class RotationRun(SQLModel, table=True):
    __tablename__ = "rotation_run"
    __table_args__ = (
        # Invariant 3: at most one open run per key, guaranteed by the database.
        Index(
            "uq_rotation_run_open_key",
            "key_id",
            unique=True,
            sqlite_where=text("finished_at IS NULL"),
            postgresql_where=text("finished_at IS NULL"),
        ),
        Index("ix_rotation_run_state_deadline", "state", "step_deadline_at"),
        UniqueConstraint("idempotency_key", name="uq_rotation_run_idempotency_key"),
    )

    id: str = Field(primary_key=True, max_length=40)
    key_id: int = Field(foreign_key="managed_key.id", index=True)
    state: RunState = Field(sa_column=Column(String(24), nullable=False))
    mode: str = Field(default="overlap", max_length=16)
    trigger: str = Field(max_length=32)            # schedule | manual | queue | emergency | deprecation | reconciler
    reason: Optional[str] = Field(default=None, max_length=64)   # expiry | max_age | deprecation | manual | breach ...
    requested_by: str = Field(max_length=200)
    idempotency_key: Optional[str] = Field(default=None, max_length=200)
    emergency: bool = False
    target_credential_type: Optional[str] = Field(default=None, max_length=64)
    #: Failed executions of the current step (its retry budget, whoever re-enqueues it); reset
    #: by every transition.
    attempts: int = 0
    #: Reconciler re-enqueues in the current state without progress (migration 0004); reset by
    #: every transition. Separate from ``attempts``, which counts the step's own failures.
    requeues: int = 0
    #: Set before the provider's issue call and cleared once its answer is known: while set, a key
    #: named after the run may exist that nobody recorded, so the next issue attempt lists the
    #: provider's keys first (migration 0004).
    issue_unknown_since: Optional[datetime] = _ts()
    old_version_id: Optional[int] = Field(default=None, foreign_key="key_version.id")
    new_version_id: Optional[int] = Field(default=None, foreign_key="key_version.id")
    not_before: Optional[datetime] = _ts()
    step_deadline_at: Optional[datetime] = _ts()
    grace_until: Optional[datetime] = _ts()
    # The execution of a step that may do its external effect now (claimed with a conditional
    # UPDATE, renewed while it runs, cleared by the transition; migration 0003).
    lease_owner: Optional[str] = Field(default=None, max_length=200)
    lease_until: Optional[datetime] = _ts()
    last_error: Optional[str] = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: Optional[datetime] = _ts()
    updated_at: Optional[datetime] = _ts()
    finished_at: Optional[datetime] = _ts()


class SinkDelivery(SQLModel, table=True):
    __tablename__ = "sink_delivery"
    __table_args__ = (UniqueConstraint("run_id", "integration", name="uq_sink_delivery_run_integration"),)

    id: Optional[int] = Field(default=None, primary_key=True)
    run_id: str = Field(foreign_key="rotation_run.id", max_length=40, index=True)
    integration: str = Field(max_length=128)
    status: str = Field(default="pending", max_length=16)  # pending | pushed | verified | failed | restored
    fingerprint: Optional[str] = Field(default=None, max_length=64)
    attempts: int = 0
    last_error: Optional[str] = Field(default=None, sa_column=Column(Text, nullable=True))
    updated_at: Optional[datetime] = _ts()


class AuditEvent(SQLModel, table=True):
    __tablename__ = "audit_event"
    __table_args__ = (Index("ix_audit_event_run", "run_id", "id"), Index("ix_audit_event_key", "key_id", "id"))

    id: Optional[int] = Field(default=None, primary_key=True)
    at: Optional[datetime] = _ts(nullable=False)
    run_id: Optional[str] = Field(default=None, max_length=40)
    key_id: Optional[int] = None
    actor: str = Field(max_length=200)      # who or what triggered it: worker:<host>, cli:<user>, scheduler, ...
    event: str = Field(max_length=64)       # state_changed | step_failed | dead_letter | key_applied | ...
    from_state: Optional[str] = Field(default=None, max_length=24)
    to_state: Optional[str] = Field(default=None, max_length=24)
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class ProviderKeySighting(SQLModel, table=True):
    """When the orphan scan first saw a provider key named after a run (migration 0004): the
    minimum-age guard uses it when the provider's list gives no creation time."""

    __tablename__ = "provider_key_sighting"

    provider: str = Field(primary_key=True, max_length=128)
    provider_key_id: str = Field(primary_key=True, max_length=200)
    first_seen_at: Optional[datetime] = _ts(nullable=False)


class InventorySnapshot(SQLModel, table=True):
    """The inventory document as applied (normalised JSON: references only, never a secret).

    One row per distinct document applied; the newest row is the inventory in force (notifications
    read their sinks from it, and ``config apply`` compares against it).
    """

    __tablename__ = "inventory_snapshot"

    id: Optional[int] = Field(default=None, primary_key=True)
    applied_at: Optional[datetime] = _ts(nullable=False, index=True)
    applied_by: str = Field(max_length=200)
    digest: str = Field(max_length=64, index=True)   # sha256 of the normalised document
    source: Optional[str] = Field(default=None, max_length=500)
    document: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    #: The document's ``notifications`` and ``owner_delivery`` (migration 0005), read without the
    #: document, whose size follows the inventory's.
    settings: Optional[dict[str, Any]] = Field(default=None, sa_column=Column(JSON, nullable=True))
