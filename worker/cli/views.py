"""Read-only queries behind ``status``, ``history`` and ``runs``: database rows → plain dicts.

The dicts are what ``--json`` prints and what the tables are drawn from, so scripts and people
see the same facts. Columns hold fingerprints and provider key ids only, never a secret.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, col, select

from worker.clock import as_utc
from worker.providers.guarantees import orphan_guard
from worker.inventory.credential_facts import carries_admin_rights
from worker.db.models import (
    AuditEvent,
    KeyVersion,
    ManagedKey,
    ProviderRecord,
    RotationRun,
    SinkDelivery,
    VersionStage,
)
from worker.protocol.states import TERMINAL_STATES, RunState

# Commands import the service modules they use inside the command function, not here:
# `keyrotor --help` and each command start without importing the whole service (start-up cost).


def _state(value: Any) -> str:
    return value.value if hasattr(value, "value") else str(value)


def run_duration_s(run: RotationRun) -> float | None:
    start, end = as_utc(run.created_at), as_utc(run.finished_at)
    if start is None or end is None:
        return None
    return max(0.0, (end - start).total_seconds())


def run_dict(run: RotationRun, key_name: str | None = None) -> dict[str, Any]:
    return {
        "id": run.id,
        "key": key_name,
        "state": _state(run.state),
        "open": run.finished_at is None,
        "mode": run.mode,
        "trigger": run.trigger,
        "reason": run.reason,
        "requested_by": run.requested_by,
        "emergency": run.emergency,
        "target_credential_type": run.target_credential_type,
        "attempts": run.attempts,
        "not_before": as_utc(run.not_before),
        "step_deadline_at": as_utc(run.step_deadline_at),
        "grace_until": as_utc(run.grace_until),
        "created_at": as_utc(run.created_at),
        "updated_at": as_utc(run.updated_at),
        "finished_at": as_utc(run.finished_at),
        "duration_s": run_duration_s(run),
        "last_error": run.last_error,
    }


def version_dict(version: KeyVersion) -> dict[str, Any]:
    return {
        "id": version.id,
        "stage": _state(version.stage),
        "run_id": version.run_id,
        "credential_type": version.credential_type,
        "provider_key_id": version.provider_key_id,
        "provider_key_name": version.provider_key_name,
        "fingerprint": version.fingerprint,
        "vault_version": version.vault_version,
        "issued_at": as_utc(version.issued_at),
        "expires_at": as_utc(version.expires_at),
        "promoted_at": as_utc(version.promoted_at),
        "retired_at": as_utc(version.retired_at),
    }


def event_dict(event: AuditEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "at": as_utc(event.at),
        "run_id": event.run_id,
        "actor": event.actor,
        "event": event.event,
        "from_state": event.from_state,
        "to_state": event.to_state,
        "detail": event.detail or {},
    }


def _latest_runs(session: Session) -> dict[int, RotationRun]:
    """The most recent run of every key (one query, grouped), keyed by key id."""
    latest = (
        select(RotationRun.key_id, func.max(RotationRun.created_at).label("created_at"))
        .group_by(col(RotationRun.key_id))
        .subquery()
    )
    rows = session.exec(
        select(RotationRun).join(
            latest,
            (col(RotationRun.key_id) == latest.c.key_id) & (col(RotationRun.created_at) == latest.c.created_at),
        )
    ).all()
    by_key: dict[int, RotationRun] = {}
    for run in rows:  # an open run wins a (rare) tie on created_at
        if run.key_id not in by_key or run.finished_at is None:
            by_key[run.key_id] = run
    return by_key


def _live_versions(session: Session) -> dict[int, dict[str, KeyVersion]]:
    rows = session.exec(
        select(KeyVersion)
        .where(col(KeyVersion.stage).in_([VersionStage.current.value, VersionStage.previous.value, VersionStage.pending.value]))
        .order_by(col(KeyVersion.id))
    ).all()
    out: dict[int, dict[str, KeyVersion]] = {}
    for version in rows:  # later ids overwrite earlier ones: the newest version of each stage
        out.setdefault(version.key_id, {})[_state(version.stage)] = version
    return out


#: Stages ``status`` shows besides the run states (a key with an open run shows the run's state).
KEY_STAGES = ("idle", "in_grace", "unseeded", "disabled")


def parse_stage_filter(value: str | None) -> str | None:
    """Validate ``status --stage``; raise ValueError naming the accepted values."""
    if value is None:
        return None
    value = value.strip().lower()
    accepted = list(KEY_STAGES) + [s.value for s in RunState]
    if value not in accepted:
        raise ValueError(f"unknown stage {value!r}; expected one of: {', '.join(accepted)}")
    return value


def key_status(session: Session, *, provider: str | None = None, stage: str | None = None) -> list[dict[str, Any]]:
    """One entry per managed key: where it stands, when it is due, how its last run went."""
    query = select(ManagedKey).order_by(col(ManagedKey.name))
    if provider is not None:
        query = query.where(ManagedKey.provider == provider)
    keys = session.exec(query).all()
    stage_arg = stage
    runs = _latest_runs(session)
    versions = _live_versions(session)
    records = {r.name: r for r in session.exec(select(ProviderRecord)).all()}
    out = []
    for key in keys:
        run = runs.get(key.id or -1)
        live = versions.get(key.id or -1, {})
        current = live.get(VersionStage.current.value)
        previous = live.get(VersionStage.previous.value)
        if not key.enabled:
            stage = "disabled"
        elif run is not None and run.finished_at is None:
            stage = _state(run.state)
        elif previous is not None:
            stage = "in_grace"
        elif current is None:
            stage = "unseeded"
        else:
            stage = "idle"
        if stage_arg is not None and stage != stage_arg:
            continue
        out.append({
            "key": key.name,
            "provider": key.provider,
            "credential_type": key.credential_type,
            # The key's credentials carry administrator rights at the provider (Workfront admins).
            "admin": carries_admin_rights(records.get(key.provider), key.credential_type),
            "owner": key.owner,
            "enabled": key.enabled,
            "stage": stage,
            "vault": f"{key.vault_mount}/{key.vault_path}#{key.vault_field}",
            "current_fingerprint": current.fingerprint if current else None,
            "previous_fingerprint": previous.fingerprint if previous else None,
            "expires_at": as_utc(key.expires_at) or (as_utc(current.expires_at) if current else None),
            "last_rotated_at": as_utc(key.last_rotated_at),
            "next_due_at": as_utc(key.next_due_at),
            "due_reason": key.due_reason,
            "last_run": run_dict(run, key.name) if run is not None else None,
            # None: every key minted under a run's name is accounted for; else what is left.
            "orphan_guard": orphan_guard(records.get(key.provider)),
        })
    return out


def key_history(session: Session, key: ManagedKey, limit: int = 50) -> dict[str, Any]:
    """The ``limit`` newest runs (newest first) and audit events (in order), and every version of one key."""
    runs = session.exec(
        select(RotationRun).where(RotationRun.key_id == key.id).order_by(col(RotationRun.created_at).desc()).limit(limit)
    ).all()
    events = session.exec(
        select(AuditEvent).where(AuditEvent.key_id == key.id).order_by(col(AuditEvent.id).desc()).limit(limit)
    ).all()
    versions = session.exec(select(KeyVersion).where(KeyVersion.key_id == key.id).order_by(col(KeyVersion.id))).all()
    return {
        "key": key.name,
        "provider": key.provider,
        "runs": [run_dict(r, key.name) for r in runs],
        "events": [event_dict(e) for e in reversed(events)],
        "versions": [version_dict(v) for v in versions],
    }


#: Pseudo-states accepted by ``runs --state`` besides the real ones.
STATE_GROUPS = {"open": None, "terminal": None}


def parse_state_filter(value: str | None) -> str | None:
    """Validate ``--state``; raise ValueError naming the accepted values."""
    if value is None:
        return None
    value = value.strip().lower()
    accepted = [s.value for s in RunState] + list(STATE_GROUPS)
    if value not in accepted:
        raise ValueError(f"unknown state {value!r}; expected one of: {', '.join(accepted)}")
    return value


def list_runs(session: Session, *, state: str | None = None, key: ManagedKey | None = None,
              since: datetime | None = None, limit: int = 50) -> list[dict[str, Any]]:
    query = select(RotationRun, ManagedKey.name).join(ManagedKey, col(ManagedKey.id) == col(RotationRun.key_id))
    if state == "open":
        query = query.where(col(RotationRun.finished_at).is_(None))
    elif state == "terminal":
        query = query.where(col(RotationRun.state).in_([s.value for s in TERMINAL_STATES]))
    elif state is not None:
        query = query.where(RotationRun.state == state)
    if key is not None:
        query = query.where(RotationRun.key_id == key.id)
    if since is not None:
        query = query.where(col(RotationRun.created_at) >= since)
    query = query.order_by(col(RotationRun.created_at).desc(), col(RotationRun.id)).limit(limit)
    return [run_dict(run, name) for run, name in session.exec(query).all()]


def run_sinks(session: Session, run_id: str) -> list[dict[str, Any]]:
    rows = session.exec(select(SinkDelivery).where(SinkDelivery.run_id == run_id).order_by(col(SinkDelivery.integration))).all()
    return [{"integration": d.integration, "status": d.status, "fingerprint": d.fingerprint,
             "attempts": d.attempts, "last_error": d.last_error, "updated_at": as_utc(d.updated_at)} for d in rows]


def describe_run(session: Session, run: RotationRun) -> dict[str, Any]:
    """One run in full: the run, its whole audit trail, its deliveries and what ``resolve`` allows."""
    key = session.get(ManagedKey, run.key_id)
    events = session.exec(select(AuditEvent).where(AuditEvent.run_id == run.id).order_by(col(AuditEvent.id))).all()
    return {
        "run": run_dict(run, key.name if key else None),
        "events": [event_dict(e) for e in events],
        "sinks": run_sinks(session, run.id),
        "allowed_actions": _allowed_actions(session, run),
    }


def _allowed_actions(session: Session, run: RotationRun) -> list[str]:
    """What ``resolve`` allows; [] for a run no person needs to act on. Deciding may read Vault
    (a staged key of a run that recorded none): when it does not answer, describe still works."""
    if _state(run.state) not in (RunState.needs_attention.value, RunState.awaiting_deposit.value):
        return []
    from worker.pipeline.resolve import allowed_actions

    try:
        return sorted(allowed_actions(session, run.id))
    except Exception:  # noqa: BLE001 - the rest of the description matters more
        return []
