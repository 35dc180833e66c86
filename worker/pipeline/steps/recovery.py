"""The failure path: ``fail_run`` moves a run to the protocol's failure target, ``compensate``
revokes a new key that was never promoted, ``rollback`` restores the old key after promotion;
a run that failed on a deprecated credential type may start the rotation to its replacement."""

from __future__ import annotations

from typing import Any, Optional

from sqlmodel import Session

from worker import log
from worker.clock import utcnow
from worker.db.models import ManagedKey, VersionStage
from worker.db.session import session_scope
from worker.errors import PermanentError, StateConflict
from worker.pipeline.context import PipelineContext
from worker.service.deprecation import (
    DEPRECATED_TYPE_FIELD,
    NewCredentialDeprecated,
    deprecated_failure_type,
    replacement_of,
    report_deprecated,
)
from worker.pipeline.effects import holding, read_pending, safe_error
from worker.pipeline.runs import load_key, load_run, load_version, run_state, transition
from worker.pipeline.steps.common import Snapshot, StepOutcome, advance_run, step_deadline_s, notify_run, load_snapshot
from worker.pipeline.steps.minted import MintedKey, minted_keys, record_discarded
from worker.pipeline.steps.provider import provider_for, revoke_key
from worker.pipeline.steps.sinks import announcement_for, push_all, raise_sink_failures
from worker.protocol import FailureKind, Mode, RunState, Step, expected_state, failure_target, parse_mode
from worker.secret import Secret

logger = log.get_logger("keyrotor.pipeline")
S = RunState


def compensate(ctx: PipelineContext, run_id: str) -> Optional[StepOutcome]:
    """compensating → failed: revoke the *new* key (never the old), discard staging."""
    snap = load_snapshot(ctx, run_id, Step.compensate)
    if snap is None:
        return None
    key, new, old = snap.key, snap.new, snap.old
    new_secret, staged_key_id = _staged_new(ctx, snap)
    new_key_id = (new.provider_key_id if new is not None else None) or staged_key_id
    new_fp = (new.fingerprint if new is not None else None) or (new_secret.fingerprint if new_secret else None)
    detail: dict[str, Any] = {"new_fingerprint": new_fp, "new_provider_key_id": new_key_id}
    with holding(new_secret):
        current = ctx.vault.read_current(key.vault_mount, key.vault_path, key.vault_field)
        if new_fp is not None and current is not None and current.secret.fingerprint == new_fp:
            # Vault already serves the new key (promote crashed before recording): restore instead.
            return advance_run(ctx, snap, S.rolling_back, detail={"reason": "Vault already serves the new key"})
        if new_key_id is not None or new_secret is not None:
            if snap.mode == Mode.cutover:
                raise PermanentError("cutover: the new key is the only valid one; it must not be revoked")
            if old is not None and ((old.provider_key_id and old.provider_key_id == new_key_id) or old.fingerprint == new_fp):
                raise PermanentError("the key to revoke is the old credential; refusing (the old key is never revoked on failure)")
            detail["revocation"] = _revoke_new_key(ctx, snap, key_id=new_key_id, secret=new_secret,
                                                   credential_type=snap.credential_type)
        ctx.vault.discard_pending(snap.run.id)
        others = _revoke_other_minted(ctx, snap, exclude=new_key_id)
        if others:
            detail["other_minted_keys"] = {m.provider_key_id: revocation for m, revocation in others}

    def apply(session: Session) -> None:
        row = load_version(session, snap.run.new_version_id)
        if row is not None:
            row.stage, row.retired_at = VersionStage.failed, utcnow()
            session.add(row)
        for minted, revocation in others:
            record_discarded(session, snap.run, actor=ctx.actor, fingerprint=minted.fingerprint,
                             provider_key_id=minted.provider_key_id, revocation=revocation, reason="compensation")

    outcome = advance_run(ctx, snap, S.failed, detail=detail, apply=apply)
    notify_run(ctx, "failed", snap, {"reason": snap.run.last_error, **detail})
    _follow_deprecation(ctx, snap)
    return outcome


def rollback(ctx: PipelineContext, run_id: str) -> Optional[StepOutcome]:
    """rolling_back → rolled_back: old secret back as newest Vault version, re-push it, revoke new."""
    snap = load_snapshot(ctx, run_id, Step.rollback)
    if snap is None:
        return None
    key, new, old = snap.key, snap.new, snap.old
    if old is None or old.vault_version is None:
        raise PermanentError("there is no previous credential to restore (first rotation of this key)")
    old_secret = ctx.vault.read_version(key.vault_mount, key.vault_path, key.vault_field, old.vault_version).secret
    new_secret, _ = _staged_new(ctx, snap)
    detail: dict[str, Any] = {"restored_fingerprint": old_secret.fingerprint}
    with holding(old_secret, new_secret):
        current = ctx.vault.read_current(key.vault_mount, key.vault_path, key.vault_field)
        if current is not None and current.secret == old_secret:
            restored = current.version
        else:
            restored = ctx.vault.restore(key.vault_mount, key.vault_path, old.vault_version,
                                         current.version if current is not None else 0)
        detail["vault_version"] = restored
        ann = announcement_for(snap, "rolled_back", old_secret, old, restored)
        failures = push_all(ctx, snap, ann, done_status="restored", skip={"restored"})
        if failures:
            raise_sink_failures(failures, "pushing the restored key")
        new_key_id = new.provider_key_id if new is not None else None
        if new is not None and (new_key_id or new_secret) and new.fingerprint != old.fingerprint:
            detail["revocation"] = _revoke_new_key(ctx, snap, key_id=new_key_id, secret=new_secret,
                                                   credential_type=new.credential_type)
        ctx.vault.discard_pending(snap.run.id)

    def apply(session: Session) -> None:
        new_row = load_version(session, snap.run.new_version_id)
        if new_row is not None:
            new_row.stage, new_row.retired_at = VersionStage.failed, utcnow()
            session.add(new_row)
        old_row = load_version(session, snap.run.old_version_id)
        assert old_row is not None
        old_row.stage, old_row.vault_version = VersionStage.current, restored
        session.add(old_row)

    outcome = advance_run(ctx, snap, S.rolled_back, detail=detail, apply=apply)
    notify_run(ctx, "rolled_back", snap, {"reason": snap.run.last_error, **detail})
    _follow_deprecation(ctx, snap)
    return outcome


def _revoke_new_key(ctx: PipelineContext, snap: Snapshot, *, key_id: Optional[str], secret: Optional[Secret],
                    credential_type: str) -> str:
    """Revoke the run's new key at the provider and report its answer: "revoked", "already_gone"
    (404), or "manual" when the provider cannot revoke (a person must)."""
    return revoke_key(provider_for(ctx, snap), key_id=key_id, secret=secret, credential_type=credential_type)


def _staged_new(ctx: PipelineContext, snap: Snapshot) -> tuple[Optional[Secret], Optional[str]]:
    """The staged secret and key id, if staging holds the run's new key (its fingerprint matches
    the one recorded at issue, or no new version was recorded yet); else ``(None, None)``."""
    staged = read_pending(ctx.vault, snap.run.id)
    if staged is None:
        return None, None
    recorded = snap.new.fingerprint if snap.new is not None else None
    if recorded is not None and staged[0].fingerprint != recorded:
        logger.warning("staging.mismatch", staged_fingerprint=staged[0].fingerprint, recorded_fingerprint=recorded)
        return None, None
    return staged


def _revoke_other_minted(ctx: PipelineContext, snap: Snapshot, *, exclude: Optional[str]) -> list[tuple[MintedKey, str]]:
    """Keys the run's issue calls minted that are neither its new key nor discarded already (their
    secret never reached staging): revoked too, so a failed run leaves none behind."""
    with session_scope(ctx.engine) as session:
        pending = [m for m in minted_keys(session, snap.run.id)
                   if not m.discarded and m.provider_key_id and m.provider_key_id != exclude]
    if not pending or snap.mode == Mode.cutover:
        return []
    provider = provider_for(ctx, snap)
    return [(m, revoke_key(provider, key_id=m.provider_key_id, secret=None, credential_type=snap.credential_type))
            for m in pending]


def _follow_deprecation(ctx: PipelineContext, snap: Snapshot) -> None:
    """The run is over and failed because its credential type is deprecated. If that is also the
    type the key uses now, the key's current credential is of a deprecated type: report it, so a
    rotation to the replacement follows (only when a different replacement is declared, so a
    type without one cannot cause a run every hour)."""
    with session_scope(ctx.engine) as session:
        deprecated = deprecated_failure_type(session, snap.run.id)
        key = session.get(ManagedKey, snap.key.id)
        if deprecated is None or key is None or key.credential_type != deprecated:
            return
        replacement = replacement_of(session, key.provider, deprecated)
    if replacement and replacement != deprecated:
        report_deprecated(ctx.engine, key_name=snap.key.name, credential_type=deprecated, requested_by=ctx.actor)


def fail_run(ctx: PipelineContext, run_id: str, step: Step, exc: BaseException, kind: FailureKind) -> Optional[RunState]:
    """Move the run to the protocol's failure target for this step; ``None`` if it moved already."""
    with session_scope(ctx.engine) as session:
        run = load_run(session, run_id)
        if run is None or run_state(run) != expected_state(step):
            return None
        key = load_key(session, run)
        target = failure_target(run.mode, run_state(run), kind, emergency=bool(run.emergency))
        error = safe_error(exc)
        detail: dict[str, str | None] = {"step": step.value, "failure": kind.value, "error": error}
        if isinstance(exc, NewCredentialDeprecated):
            detail[DEPRECATED_TYPE_FIELD] = exc.credential_type
            detail["replacement"] = exc.replacement
        try:
            # needs_attention keeps the attempt count for the person who looks (resolve resets it).
            kept: dict[str, Any] = {"attempts": run.attempts} if target == S.needs_attention else {}
            transition(session, run, target, actor=ctx.actor, last_error=error, deadline_s=step_deadline_s(ctx, target),
                       detail=detail, **kept)
        except StateConflict:
            session.rollback()
            return None
    logger.warning("run.failed_step", failure=kind.value, to_state=target.value, error=error)
    if target == S.needs_attention:
        snap = Snapshot(run=run, key=key, old=None, new=None, mode=parse_mode(run.mode))
        alert: dict[str, Any] = {"step": step.value, "error": error, "failure": kind.value}
        if run.emergency:  # the exposed credential is still the one in service
            alert.update(emergency=True, action="the emergency rotation did not complete: the exposed credential is "
                                                f"still in use; fix the cause, then `keyrotor resolve {run.id} --action retry`")
        notify_run(ctx, "needs_attention", snap, alert)
    return target
