"""Owners' deposits (assisted mode): the scheduler's ``deposits`` job.

For every run awaiting a deposit: read the key's deposit path in Vault
(``<KEYROTOR_VAULT_MOUNT>/<KEYROTOR_VAULT_DEPOSIT_PREFIX>/<key slug>``, which the owner's policy may
write but not read). A deposit is checked at the provider at once: accepted → staged, the run
moves on, the owner is thanked; rejected → the owner is told why and the run keeps waiting.
Either way the deposit is destroyed (every version and its metadata). Without a deposit, the
owner is reminded every ``assisted.remind_every`` (the key's, from the applied inventory) and,
``assisted.deposit_deadline`` after the run began waiting, the run goes to ``needs_attention``
with an alert. Reminders and rejections are audit events, so the timing survives restarts and
leader changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Optional

from sqlmodel import col, select

from worker.clock import as_utc, utcnow
from worker.db.models import AuditEvent, ManagedKey, RotationRun
from worker.protocol.states import RunState
from worker.db.session import session_scope
from worker.errors import StateConflict
from worker.inventory.snapshot import assisted_timings, create_url, document_for
from worker.log import get_logger
from worker.notice_text import deposit_detail
from worker.owner_notices import contact_of, notify_owner
from worker.pipeline.context import PipelineContext
from worker.pipeline.deposit import DepositRejected, deposit
from worker.pipeline.effects import safe_error
from worker.pipeline.runs import audit, load_run, run_state, transition

log = get_logger(__name__)


@dataclass
class DepositPass:
    accepted: list[str] = field(default_factory=list)   # run ids
    rejected: list[str] = field(default_factory=list)
    reminded: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)    # → needs_attention


def depositor(key: ManagedKey, claimed_by: Optional[str]) -> str:
    """The audit actor of a Vault deposit: the key's owner, whose Vault policy is the one allowed
    to write the path (enforced by Vault); the person's name is *claimed* and kept in the detail."""
    return f"owner:{key.owner}" + (f" ({claimed_by})" if claimed_by else "")


def waiting_since(session: Any, run: RotationRun) -> datetime:
    """When the run last began waiting for a deposit (its audit trail; else its last update)."""
    at = session.exec(
        select(AuditEvent.at).where(AuditEvent.run_id == run.id, AuditEvent.event == "state_changed",
                                    AuditEvent.to_state == RunState.awaiting_deposit.value)
        .order_by(col(AuditEvent.id).desc()).limit(1)
    ).first()
    since = as_utc(at or run.updated_at or run.created_at)
    assert since is not None  # a stored run has its creation time
    return since


def _last_reminder(session: Any, run_id: str) -> Optional[datetime]:
    at = session.exec(select(AuditEvent.at).where(AuditEvent.run_id == run_id, AuditEvent.event == "deposit_reminder_sent")
                      .order_by(col(AuditEvent.id).desc()).limit(1)).first()
    return as_utc(at) if at is not None else None


def collect_deposits(ctx: PipelineContext, *, now: Optional[datetime] = None, batch: int = 200,
                     settings: Any = None) -> DepositPass:
    """One pass over the runs awaiting a deposit (see the module docstring)."""
    now = now or utcnow()
    result = DepositPass()
    with session_scope(ctx.engine) as session:
        rows = session.exec(
            select(RotationRun, ManagedKey).join(ManagedKey, col(ManagedKey.id) == col(RotationRun.key_id))
            .where(RotationRun.state == RunState.awaiting_deposit.value).order_by(col(RotationRun.created_at)).limit(batch)
        ).all()
        todo = [(run, key, waiting_since(session, run), _last_reminder(session, run.id)) for run, key in rows]
        for run, key, _, _ in todo:
            session.expunge(run)
            session.expunge(key)
    if not todo:
        return result
    document = document_for(ctx.engine, [key.name for _, key, _, _ in todo], [key.provider for _, key, _, _ in todo])
    for run, key, since, reminded_at in todo:
        try:
            _one(ctx, document, run, key, since, reminded_at, now, result, settings)
        except Exception as exc:  # one run's trouble (Vault down, a provider error) must not stop the others
            log.error("deposit.pass_failed", run_id=run.id, key=key.name, error=safe_error(exc))
    return result


def _one(ctx: PipelineContext, document: dict[str, Any], run: RotationRun, key: ManagedKey, since: datetime,
         reminded_at: Optional[datetime], now: datetime, result: DepositPass, settings: Any) -> None:
    timings = assisted_timings(document, key.name)
    credential_type = run.target_credential_type or key.credential_type
    deadline = since + timings.deposit_deadline
    detail = deposit_detail(provider=key.provider, credential_type=credential_type, owner=key.owner,
                            contact=contact_of(document, key.name), mount=ctx.vault.staging_mount,
                            path=ctx.vault.deposit_path(key.name), create_url=create_url(document, key.provider, credential_type),
                            run_id=run.id, deadline_at=deadline.isoformat())

    def tell(event: str, extra: dict[str, Any]) -> None:
        notify_owner(ctx.engine, event, key_name=key.name, run_id=run.id, detail={**detail, **extra},
                     vault=ctx.vault, settings=settings)

    found = ctx.vault.read_deposit(key.name)
    if found is not None:
        origin = {"source": "vault", "vault_path": f"{ctx.vault.staging_mount}/{ctx.vault.deposit_path(key.name)}",
                  "vault_version": found.version, "written_at": found.created_at.isoformat() if found.created_at else None,
                  "claimed_by": found.claimed_by}
        try:
            deposit(run_id=run.id, secret=found.secret, deposited_by=depositor(key, found.claimed_by), ctx=ctx,
                    detail=origin)
        except DepositRejected as exc:
            ctx.vault.destroy_deposit(key.name)
            with session_scope(ctx.engine) as session:
                row = load_run(session, run.id)
                if row is not None:
                    audit(session, row, actor="scheduler", event="deposit_rejected",
                          detail={**origin, "fingerprint": found.secret.fingerprint, "reason": str(exc)})
            tell("deposit_rejected", {"reason": str(exc), "fingerprint": found.secret.fingerprint,
                                      "next_step": "create another " + detail["next_step"].split("create a new ", 1)[-1]})
            result.rejected.append(run.id)
            log.warning("deposit.rejected", run_id=run.id, key=key.name, fingerprint=found.secret.fingerprint)
            return
        ctx.vault.destroy_deposit(key.name)
        tell("deposit_accepted", {"fingerprint": found.secret.fingerprint,
                                  "next_step": "nothing for now; keyrotor rolls it out and tells you when to revoke the old one"})
        result.accepted.append(run.id)
        log.info("deposit.accepted", run_id=run.id, key=key.name, fingerprint=found.secret.fingerprint)
        return
    if now >= deadline:
        _expire(ctx, run, key, since, timings.deposit_deadline)
        tell("needs_attention", {"reason": f"no working credential was deposited within {timings.deposit_deadline}",
                                 "next_step": "ask an operator (the run needs attention); a late deposit is not picked up "
                                              "until they retry the run"})
        result.expired.append(run.id)
        return
    if now - (reminded_at or since) >= timings.remind_every:
        tell("deposit_reminder", {"waiting_since": since.isoformat()})
        with session_scope(ctx.engine) as session:
            row = load_run(session, run.id)
            if row is not None and run_state(row) == RunState.awaiting_deposit:
                session.add(AuditEvent(at=now, run_id=run.id, key_id=key.id, actor="scheduler", event="deposit_reminder_sent",
                                       detail={"deadline_at": deadline.isoformat(), "contact": detail["contact"]}))
        result.reminded.append(run.id)


def _expire(ctx: PipelineContext, run: RotationRun, key: ManagedKey, since: datetime, allowed: timedelta) -> None:
    """awaiting_deposit → needs_attention, with the shared alert (``needs_attention``)."""
    reason = f"no working credential was deposited within {allowed} (waiting since {since.isoformat()})"
    try:
        with session_scope(ctx.engine) as session:
            row = load_run(session, run.id)
            if row is None or run_state(row) != RunState.awaiting_deposit:
                return
            transition(session, row, RunState.needs_attention, actor="scheduler", deadline_s=None,
                       detail={"reason": reason, "stopped_in": RunState.awaiting_deposit.value}, last_error=reason)
    except StateConflict:
        return
    log.error("run.alert", alert="needs_attention", run_id=run.id, key=key.name, reason=reason)
    if ctx.notify is not None:
        ctx.notify("needs_attention", key_name=key.name, run_id=run.id,
                   detail={"provider": key.provider, "credential_type": run.target_credential_type or key.credential_type,
                           "reason": reason, "next_step": f"keyrotor resolve {run.id} --action retry (ask the owner) "
                                                          f"or --action cancel"})
