"""Expiry reminders for keys that cannot be rotated automatically (``assisted`` providers).

Detection opens their run (it waits for the owner's deposit); this job tells the owner ahead
of time and keeps telling them, at most once per ``repeat_s`` per key, until the key's run is
waiting for the deposit — from then on the ``deposits`` job (``worker/service/deposits.py``) reminds them
at the key's ``assisted.remind_every`` until the deposit or its deadline. Each reminder is recorded in the audit trail, which is also how the
"once per repeat_s" rule survives a scheduler restart or a leader change.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Callable

from sqlmodel import col, select

from worker.service.plan import can_rotate_automatically
from worker.pipeline.targets import rotation_target
from worker.clock import as_utc, utcnow
from worker.db.models import AuditEvent, ManagedKey, ProviderRecord, RotationRun
from worker.db.session import session_scope
from worker.log import get_logger
from worker.notify import notify_function

log = get_logger(__name__)

NotifyFn = Callable[..., None]


def _default_notify(engine: Any) -> NotifyFn:
    """Notifications to the sinks of the inventory applied to ``engine`` (not the process's
    default database); the scheduler passes one with its settings (Vault references)."""
    return notify_function(engine)


def send_reminders(
    engine: Any,
    *,
    now: datetime | None = None,
    lead_s: float = 14 * 86400.0,
    repeat_s: float = 86400.0,
    notify: NotifyFn | None = None,
    batch: int = 500,
) -> list[str]:
    """Remind the owners of manually rotated keys due within ``lead_s``; returns the key names."""
    now = now or utcnow()
    notify = notify or _default_notify(engine)
    reminded: list[str] = []
    with session_scope(engine) as session:
        rows = session.exec(
            select(ManagedKey, ProviderRecord)
            .join(ProviderRecord, col(ProviderRecord.name) == col(ManagedKey.provider))
            .where(col(ManagedKey.enabled).is_(True), col(ManagedKey.next_due_at) <= now + timedelta(seconds=lead_s),
                   ProviderRecord.mode == "assisted")
            .order_by(col(ManagedKey.next_due_at))
            .limit(batch)
        ).all()
        todo = []
        for key, record in rows:
            if can_rotate_automatically(record):
                continue
            last = session.exec(
                select(AuditEvent.at).where(AuditEvent.key_id == key.id, AuditEvent.event == "reminder_sent")
                .order_by(col(AuditEvent.id).desc()).limit(1)
            ).first()
            if last is not None and now - as_utc(last) < timedelta(seconds=repeat_s):
                continue
            run = session.exec(select(RotationRun).where(col(RotationRun.key_id) == key.id, col(RotationRun.finished_at).is_(None))).first()
            if run is not None and run.state == "awaiting_deposit":
                continue  # the deposits job reminds the owner of a run waiting for their deposit
            due = as_utc(key.next_due_at)
            # What the run will ask for: the replacement once the type is deprecated at the due time.
            target = rotation_target(provider=key.provider, provider_spec=record.spec if record else None,
                                     current_type=key.credential_type, requested=None, now=max(due or now, now))
            detail = {
                "provider": key.provider, "owner": key.owner, "credential_type": key.credential_type,
                "target_credential_type": target or key.credential_type, "reason": key.due_reason,
                "due_at": due.isoformat() if due else None, "overdue": bool(due and due <= now),
                "expires_at": as_utc(key.expires_at).isoformat() if key.expires_at else None,
                "run_state": run.state if run else None,
                "action": (f"create a new {target or key.credential_type} at {key.provider} when keyrotor asks for it "
                           "(a notice names your deposit path in Vault); operators: "
                           f"`keyrotor deposit {key.name}` once the key's run awaits a deposit"),
            }
            todo.append((key.id, key.name, run.id if run else None, detail))
    for key_id, name, run_id, detail in todo:
        notify("reminder", key_name=name, run_id=run_id, detail=detail)
        with session_scope(engine) as session:
            session.add(AuditEvent(at=now, run_id=run_id, key_id=key_id, actor="scheduler", event="reminder_sent",
                                   detail={"due_at": detail["due_at"], "reason": detail["reason"]}))
        reminded.append(name)
        log.info("reminder_sent", key=name, run_id=run_id, due_at=detail["due_at"])
    return reminded
