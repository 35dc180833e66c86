"""``keyrotor plan``: what will rotate when, and why — read from the indexed due times.

Each item says when (``next_due_at``; overdue keys rotate at the next detection pass), why
(expiry, max_age, deprecation), what the rotation issues (the replacement type when the key's
type is deprecated), and whether a person has to act: keys of ``assisted`` providers (or of
providers that cannot issue keys through an API) cannot be rotated automatically. Runs already
under way and old credentials waiting for the end of their grace period are listed too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_
from sqlmodel import col, select, Session

from worker.service.deprecation import replacement_type
from worker.clock import as_utc, utcnow
from worker.db.models import ManagedKey, ProviderRecord, RotationRun, saved_id
from worker.protocol.states import RunState
from worker.inventory.credential_facts import carries_admin_rights
from worker.providers.guarantees import orphan_guard


@dataclass(frozen=True)
class PlanItem:
    when: datetime
    key: str
    provider: str
    reason: str                 # expiry | max_age | deprecation | retire | in_progress ...
    action: str                 # rotate | manual | in_progress | retire
    automatic: bool             # False: a person must deposit the new credential
    credential_type: str
    target_credential_type: str
    owner: str
    overdue: bool
    run_id: str | None = None
    run_state: str | None = None
    note: str = ""
    admin: bool = False         # the key's credentials carry administrator rights at the provider

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _deprecation_phase(record: ProviderRecord | None, credential_type: str, at: datetime) -> str | None:
    types = ((record.spec or {}) if record else {}).get("credential_types") or {}
    spec = types.get(credential_type) if isinstance(types, dict) else None
    phase: str | None = None
    for entry in (spec or {}).get("deprecation") or []:
        start = entry.get("from") or entry.get("from_")
        try:
            started = as_utc(datetime.fromisoformat(str(start).replace("Z", "+00:00")))
        except ValueError:
            continue
        if started is not None and started <= at:
            phase = entry.get("phase")
    return phase


def can_rotate_automatically(record: ProviderRecord | None) -> bool:
    """An API to mint keys and a mode that uses it; ``assisted`` providers wait for a person."""
    if record is None or record.mode == "assisted":
        return False
    calls = (record.spec or {}).get("calls") or {}
    return bool(calls.get("issue")) if record.kind == "http" else True


def build_plan(session: Session, *, now: datetime | None = None, days: float = 30.0) -> list[PlanItem]:
    now = now or utcnow()
    horizon = now + timedelta(days=days)
    providers = {p.name: p for p in session.exec(select(ProviderRecord)).all()}
    items: list[PlanItem] = []

    keys = session.exec(
        select(ManagedKey)
        .where(col(ManagedKey.enabled).is_(True), col(ManagedKey.next_due_at) <= horizon)
        .order_by(col(ManagedKey.next_due_at))
    ).all()
    open_runs = {
        r.key_id: r
        for r in session.exec(select(RotationRun).where(col(RotationRun.finished_at).is_(None))).all()
    }
    seen_runs: set[str] = set()
    for key in keys:
        record = providers.get(key.provider)
        due = as_utc(key.next_due_at)
        assert due is not None
        automatic = can_rotate_automatically(record)
        phase = _deprecation_phase(record, key.credential_type, max(due, now))
        target = (replacement_type(record, key.credential_type) if phase else None) or key.credential_type
        run = open_runs.get(saved_id(key))
        notes = []
        if phase:
            notes.append(f"{key.credential_type} is in phase {phase} at that time; migrates to {target}")
        if not automatic:
            notes.append("cannot be rotated automatically: the owner creates the new credential and writes it to the key's deposit path in Vault (or an operator runs `keyrotor deposit`)")
        guard = orphan_guard(record)
        if guard:
            notes.append(guard)
        if run is not None:
            seen_runs.add(run.id)
            action, run_id, run_state = "in_progress", run.id, RunState(run.state).value
            if run.state == RunState.awaiting_deposit.value:
                notes.append("waiting for the new credential to be deposited")
            elif run.state == RunState.needs_attention.value:
                notes.append(f"run needs attention: {run.last_error or 'see keyrotor history'}")
        else:
            action, run_id, run_state = ("rotate" if automatic else "manual"), None, None
        items.append(PlanItem(
            when=due, key=key.name, provider=key.provider, reason=key.due_reason or "due", action=action,
            automatic=automatic, credential_type=key.credential_type, target_credential_type=target, owner=key.owner,
            overdue=due <= now, run_id=run_id, run_state=run_state, note="; ".join(notes),
            admin=carries_admin_rights(record, target),
        ))

    # Old credentials in their grace period: retired when it ends (no longer due, so not above).
    grace_runs = session.exec(
        select(RotationRun, ManagedKey)
        .join(ManagedKey, col(ManagedKey.id) == col(RotationRun.key_id))
        .where(col(RotationRun.state) == RunState.verified.value, or_(col(RotationRun.grace_until).is_(None), col(RotationRun.grace_until) <= horizon))
    ).all()
    for run, key in grace_runs:
        if run.id in seen_runs:
            continue
        when = as_utc(run.grace_until) or now
        items.append(PlanItem(
            when=when, key=key.name, provider=key.provider, reason="retire", action="retire", automatic=True,
            credential_type=key.credential_type, target_credential_type=key.credential_type, owner=key.owner,
            overdue=when <= now, run_id=run.id, run_state=run.state, note="old credential revoked when the grace period ends",
            admin=carries_admin_rights(providers.get(key.provider), key.credential_type),
        ))
    items.sort(key=lambda item: (item.when, item.key))
    return items
