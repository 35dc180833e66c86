"""The first step of a run: ``issue`` mints the new credential and stages it in Vault, or, in
assisted mode, ``request_deposit`` asks the owner for it. Both wait for the run's ``not_before``."""

from __future__ import annotations

from typing import Any, Optional

from worker import log
from worker.clock import as_utc, utcnow
from worker.db.session import session_scope
from worker.errors import DeprecatedCredential, PermanentError, StateConflict
from worker.pipeline.context import PipelineContext
from worker.pipeline.effects import holding, read_pending, safe_error, seconds_between
from worker.pipeline.lease import transitioned
from worker.pipeline.preflight import check_run_references
from worker.pipeline.runs import load_run, run_state, transition
from worker.pipeline.steps.common import Snapshot, StepOutcome, _deadline_s, _notify, _snapshot
from worker.pipeline.steps.provider import _new_deprecated, _provider
from worker.pipeline.steps.versions import _ensure_old_version, _record_new_version
from worker.protocol import Mode, RunState, Step
from worker.secret import Secret

logger = log.get_logger("keyrotor.pipeline")
S = RunState


def _not_before_delay(snap: Snapshot) -> Optional[float]:
    if snap.run.not_before is None:
        return None
    wait = seconds_between(as_utc(snap.run.not_before), utcnow())  # type: ignore[arg-type]
    return wait if wait > 0 else None


def issue(ctx: PipelineContext, run_id: str) -> Optional[StepOutcome]:
    """requested → issued: mint the new credential (never twice per run) and stage it in Vault."""
    snap = _snapshot(ctx, run_id, Step.issue)
    if snap is None:
        return None
    wait = _not_before_delay(snap)
    if wait is not None:
        return StepOutcome(state=S.requested, mode=snap.mode, again_in_s=wait)
    staged = read_pending(ctx.vault, snap.run.id)
    if staged is None:  # nothing issued yet: a broken reference fails the run before any effect
        check_run_references(ctx, snap.key, snap.provider_record)
    provider = _provider(ctx, snap)
    name = f"keyrotor-{snap.run.id}"
    expires_at = None
    recovered = staged is not None
    if staged is not None:  # a previous attempt issued and staged, then crashed before recording
        secret, key_id = staged
        expires_at = ctx.vault.pending_expiry(snap.run.id)
    else:
        if getattr(provider, "can_list", False):
            orphan = next((k for k in provider.list_keys() if getattr(k, "name", None) == name), None)
            if orphan is not None:
                _record_lost_orphan(ctx, snap, getattr(orphan, "key_id", None), name)
        if not getattr(provider, "can_issue", True):
            raise PermanentError(f"provider {snap.key.provider!r} cannot issue keys; set its mode to 'assisted'")
        try:
            issued = provider.issue(name=name, credential_type=snap.credential_type, labels=dict(snap.key.labels or {}))
        except DeprecatedCredential:
            raise _new_deprecated(ctx, snap, "issue") from None
        secret, key_id, expires_at = issued.secret, issued.key_id, issued.expires_at
        with holding(secret):
            try:
                # The secret exists only in this process's memory until staged. The store already
                # retries transient Vault errors (bounded, backoff, jitter, Retry-After); a second
                # layer here would multiply its attempts, so one call, and on failure the key is
                # revoked and the step's own (Dramatiq) retry issues a fresh one.
                ctx.vault.stage_pending(snap.run.id, secret, key_id, expires_at)
            except BaseException:
                # Never staged = never usable: revoke it now rather than leave an orphan behind
                # (not in cutover: there it is the only valid key, so a person must look).
                if snap.mode != Mode.cutover:
                    _revoke_quietly(provider, key_id=key_id, secret=secret, credential_type=snap.credential_type)
                raise

    detail = {"fingerprint": secret.fingerprint, "provider_key_id": key_id, "recovered_from_staging": recovered}
    if snap.mode == Mode.cutover:
        detail["cutover_window"] = "opened: the provider invalidated the previous key"
    with session_scope(ctx.engine) as session:
        old_id = _ensure_old_version(ctx, snap, session)
        new_id = _record_new_version(session, snap, secret=secret, key_id=key_id, name=name, expires_at=expires_at)
        transition(session, snap.run, S.issued, actor=ctx.actor, detail=detail,
                   deadline_s=_deadline_s(ctx, S.issued), old_version_id=old_id, new_version_id=new_id, refresh=False)
    transitioned()
    logger.info("run.transition", from_state="requested", to_state="issued", fingerprint=secret.fingerprint)
    return StepOutcome(state=S.issued, mode=snap.mode)


def _record_lost_orphan(ctx: PipelineContext, snap: Snapshot, key_id: Optional[str], name: str) -> None:
    """The provider holds our key but its secret was lost before staging: record it so that
    compensation revokes it, and fail (issuing a second key for the run is not allowed)."""
    with session_scope(ctx.engine) as session:
        run = load_run(session, snap.run.id)
        if run is None or run_state(run) != S.requested:
            raise StateConflict(f"run {snap.run.id} moved on while recovering its issued key")
        if run.new_version_id is None:
            run.new_version_id = _record_new_version(session, snap, secret=None, key_id=key_id, name=name, expires_at=None)
            session.add(run)
    raise PermanentError(f"the provider already holds key {name} (id {key_id}) but its secret was lost before "
                         "it reached Vault; compensating revokes it and the next run issues a fresh key")


def _revoke_quietly(provider: Any, *, key_id: Optional[str], secret: Optional[Secret], credential_type: str) -> None:
    try:
        provider.revoke(key_id=key_id, secret=secret, credential_type=credential_type)
    except Exception as exc:
        logger.error("revoke.failed", provider_key_id=key_id, error=safe_error(exc))


def request_deposit(ctx: PipelineContext, run_id: str) -> Optional[StepOutcome]:
    """assisted: requested → awaiting_deposit; the owner is asked to run ``keyrotor deposit``."""
    snap = _snapshot(ctx, run_id, Step.request_deposit)
    if snap is None:
        return None
    wait = _not_before_delay(snap)
    if wait is not None:
        return StepOutcome(state=S.requested, mode=snap.mode, again_in_s=wait)
    check_run_references(ctx, snap.key)
    with session_scope(ctx.engine) as session:
        old_id = _ensure_old_version(ctx, snap, session)
        transition(session, snap.run, S.awaiting_deposit, actor=ctx.actor, deadline_s=None, old_version_id=old_id,
                   detail={"owner": snap.key.owner, "command": f"keyrotor deposit {snap.run.id}"}, refresh=False)
    transitioned()
    _notify(ctx, "started", snap, {"action": "deposit_required", "owner": snap.key.owner,
                                   "command": f"keyrotor deposit {snap.run.id}",
                                   "credential_type": snap.credential_type})
    return StepOutcome(state=S.awaiting_deposit, mode=snap.mode)
