"""The end of a successful run: ``retire`` revokes the old key after the grace period and confirms
it is rejected, ``finish`` records the rotation on the key."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Optional

from sqlalchemy import update
from sqlmodel import col, select

from worker.clock import as_utc, utcnow
from worker.db.models import AuditEvent, ProviderRecord, RotationRun, VersionStage
from worker.db.session import session_scope
from worker.errors import DeprecatedCredential, PermanentError, TransientError
from worker.pipeline.context import PipelineContext
from worker.service.deprecation import report_deprecated
from worker.pipeline.effects import holding, seconds_between
from worker.pipeline.row_writes import RowChange
from worker.pipeline.runs import audit, load_run
from worker.pipeline.steps.common import StepOutcome, advance_run, notify_run, load_snapshot
from worker.pipeline.steps.provider import check_credential, deprecated_error, provider_for, recheck_credential, revoke_key
from worker.protocol import Mode, RunState, Step
from worker.secret import Secret
from worker.inventory.snapshot import assisted_timings, document_for
from worker.owner_notices import notify_owner
from worker.service.due import next_due_after
from worker.pipeline.targets import rejected_at

S = RunState


def retire(ctx: PipelineContext, run_id: str) -> Optional[StepOutcome]:
    """verified → retired, after the grace period: revoke the old key and confirm it is rejected."""
    snap = load_snapshot(ctx, run_id, Step.retire)
    if snap is None:
        return None
    now = utcnow()
    if snap.run.grace_until is not None and now < as_utc(snap.run.grace_until):
        return StepOutcome(state=S.verified, mode=snap.mode,
                           again_in_s=seconds_between(as_utc(snap.run.grace_until), now))
    old, new, key = snap.old, snap.new, snap.key
    if old is None or (old.stage == VersionStage.retired.value and snap.mode != Mode.cutover):
        return advance_run(ctx, snap, S.retired, detail={"old": None if old is None else "already retired"})
    if new is None:
        raise PermanentError(f"run {snap.run.id} has no new version recorded; refusing to revoke the old key")
    if (old.provider_key_id and old.provider_key_id == new.provider_key_id) or old.fingerprint == new.fingerprint:
        raise PermanentError("the old and new versions are the same credential; refusing to revoke it")
    provider = provider_for(ctx, snap)
    # Invariants 1 and 2 are about what consumers get: check the secret Vault *serves* now (not a
    # staged copy, which may be gone), and refuse if it is not the new credential any more.
    served = ctx.vault.read_current(key.vault_mount, key.vault_path, key.vault_field)
    if served is None or served.secret.fingerprint != new.fingerprint:
        raise PermanentError(f"Vault no longer serves the new credential at {key.vault_mount}/{key.vault_path}; "
                             "the old credential is kept (find out who changed the path, then resolve the run)")
    new_secret = served.secret
    old_secret: Optional[Secret] = None
    if old.vault_version is not None:
        old_secret = ctx.vault.read_version(key.vault_mount, key.vault_path, key.vault_field, old.vault_version).secret
    detail: dict[str, Any] = {"old_fingerprint": old.fingerprint, "old_provider_key_id": old.provider_key_id}
    with holding(new_secret, old_secret):
        # Invariant 1 and 2: never revoke the old key unless the new one still authenticates.
        new_outcome, reused_after = recheck_credential(provider, new_secret, snap.credential_type)
        if reused_after is not None:
            detail["new_check"] = f"valid at verify {reused_after * 1000:.0f} ms before, in this chain"
        if new_outcome == "deprecated":
            raise deprecated_error(ctx, snap, "retire")
        if new_outcome != "valid":
            raise PermanentError("the new credential no longer authenticates; the old one is kept")
        old_deprecated = False
        if snap.mode == Mode.cutover:
            detail["revocation"] = "invalidated by issuing the new key"
        elif not old.provider_key_id and _type_rejected(ctx, key.provider, old.credential_type, now):
            # No id to revoke it by, and its type is past its cutoff: the check below confirms it is dead.
            detail["revocation"] = "nothing to revoke: the provider rejects this credential type since its cutoff"
        else:
            try:
                detail["revocation"] = revoke_key(provider, key_id=old.provider_key_id, secret=old_secret,
                                                  credential_type=old.credential_type)
            except DeprecatedCredential:
                # The call authenticated with the old credential and the provider rejected it as
                # deprecated: it cannot revoke itself. The check below decides whether it still works.
                old_deprecated = True
                detail["revocation"] = "rejected as deprecated by the provider"
        if old_secret is not None:
            outcome = check_credential(provider, old_secret, old.credential_type)
            detail["old_check"] = outcome
            old_deprecated = old_deprecated or outcome == "deprecated"
            if outcome == "valid" and detail["revocation"] != "manual":
                since = seconds_between(now, snap.run.grace_until)
                message = f"the old credential still authenticates {since:.0f}s after revocation"
                if since < ctx.policy.revocation_timeout_s:
                    raise TransientError(message)
                raise PermanentError(message + "; revoke it at the provider by hand")
    if detail["revocation"] == "manual":
        if old_secret is None:  # nothing to check with: ask once, and say so in the audit trail
            detail["old_check"] = "impossible: the old credential is not in Vault"
            ask_owner_to_revoke(ctx, snap, old.fingerprint, first=True)
        elif detail["old_check"] == "invalid":
            detail["revocation"] = "revoked by the owner (the provider rejects it)"
        elif detail["old_check"] == "deprecated":  # e.g. Asana's 434 after the cutoff: nobody can use it
            detail["revocation"] = "rejected by the provider as deprecated (it can no longer authenticate)"
        else:
            return wait_for_owner_revocation(ctx, snap, old.fingerprint, now)

    retired = [RowChange(old, {"stage": VersionStage.retired, "retired_at": now})] if detail["revocation"] != "manual" else []
    outcome_ = advance_run(ctx, snap, S.retired, detail=detail, changes=retired)
    if old_deprecated:  # after the commit: it joins this (still open) run, or is stale once it completes
        report_deprecated(ctx.engine, key_name=key.name, credential_type=old.credential_type, requested_by=ctx.actor)
    return outcome_


def _type_rejected(ctx: PipelineContext, provider: str, credential_type: str, now: datetime) -> bool:
    with session_scope(ctx.engine) as session:
        record = session.get(ProviderRecord, provider)
        return record is not None and rejected_at(record.spec, credential_type, now)


def ask_owner_to_revoke(ctx: PipelineContext, snap: Any, old_fingerprint: Optional[str], *, first: bool,
                        deadline: Optional[datetime] = None) -> None:
    """Tell the owner to revoke the old credential (``revoke_requested``) and record it."""
    detail = {"provider": snap.key.provider, "credential_type": snap.credential_type, "owner": snap.key.owner,
              "old_fingerprint": old_fingerprint,
              "next_step": f"revoke the old {snap.credential_type} (fingerprint {old_fingerprint}) at "
                           f"{snap.key.provider}; the new one is in service. keyrotor checks that the old one is "
                           "rejected and then completes the rotation",
              "deadline_at": deadline.isoformat() if deadline else None}
    notify_run(ctx, "reminder", snap, {"action": "revoke_old_credential", **detail})
    notify_owner(ctx.engine, "revoke_requested", key_name=snap.key.name, run_id=snap.run.id, detail=detail, vault=ctx.vault)
    with session_scope(ctx.engine) as session:
        run = load_run(session, snap.run.id)
        if run is not None:
            audit(session, run, actor=ctx.actor, event="revoke_requested",
                  detail={"old_fingerprint": old_fingerprint, "first": first,
                          "deadline_at": deadline.isoformat() if deadline else None})


def wait_for_owner_revocation(ctx: PipelineContext, snap: Any, old_fingerprint: Optional[str], now: datetime) -> StepOutcome:
    """The provider cannot revoke by API and the old credential still works: ask the owner (again
    every ``assisted.remind_every``), poll every ``assisted.revoke_check_every``, and past
    ``assisted.revoke_deadline`` (from the first request) fail → needs_attention. Never forever."""
    timings = assisted_timings(document_for(ctx.engine, [snap.key.name]), snap.key.name)
    with session_scope(ctx.engine) as session:
        asked = [as_utc(at) for at in session.exec(
            select(AuditEvent.at).where(AuditEvent.run_id == snap.run.id, AuditEvent.event == "revoke_requested")
            .order_by(col(AuditEvent.id))).all() if at is not None]
    deadline = (asked[0] if asked else now) + timings.revoke_deadline
    if now >= deadline:
        raise PermanentError(f"the old credential (fingerprint {old_fingerprint}) still authenticates "
                             f"{timings.revoke_deadline} after the owner was asked to revoke it; revoke it at the "
                             "provider by hand, then retry the run")
    if not asked or now - asked[-1] >= timings.remind_every:
        ask_owner_to_revoke(ctx, snap, old_fingerprint, first=not asked, deadline=deadline)
    wait = min(timings.revoke_check_every.total_seconds(), seconds_between(deadline, now))
    with session_scope(ctx.engine) as session:  # a person is being waited for: not stuck (reconciler)
        session.execute(update(RotationRun).where(col(RotationRun.id) == snap.run.id, col(RotationRun.state) == S.verified.value)
                        .values(step_deadline_at=now + timedelta(seconds=wait + 2 * ctx.policy.time_limit_ms / 1000))
                        .execution_options(synchronize_session=False))
    return StepOutcome(state=S.verified, mode=snap.mode, again_in_s=max(wait, 0.1))


def finish(ctx: PipelineContext, run_id: str) -> Optional[StepOutcome]:
    """retired → completed: discard staging, record the rotation on the key, compute its next due."""
    snap = load_snapshot(ctx, run_id, Step.finish)
    if snap is None:
        return None
    ctx.vault.discard_pending(snap.run.id)
    now = utcnow()
    rotated: dict[str, Any] = {"last_rotated_at": now, "updated_at": now,
                               "expires_at": snap.new.expires_at if snap.new is not None else None}
    if snap.run.target_credential_type:
        rotated["credential_type"] = snap.run.target_credential_type
    record = snap.provider_record
    rotated.update(next_due_after(snap.key, rotated, record.spec if record is not None else None, now))
    outcome = advance_run(ctx, snap, S.completed, changes=[RowChange(snap.key, rotated)],
                          detail={"fingerprint": snap.new.fingerprint if snap.new else None})
    notify_run(ctx, "succeeded", snap, {"fingerprint": snap.new.fingerprint if snap.new else None})
    return outcome
