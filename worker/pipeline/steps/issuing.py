"""The first step of a run: ``issue`` mints the new credential and stages it in Vault, or, in
assisted mode, ``request_deposit`` asks the owner for it. Both wait for the run's ``not_before``."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Callable, Optional

from sqlalchemy import bindparam, update

from worker import log
from worker.clock import as_utc, utcnow
from worker.db import direct
from worker.db.direct import DirectStatements
from worker.db.session import session_scope, statement_scope
from worker.errors import ConfigError, DeprecatedCredential, PermanentError, RateLimited, StateConflict, is_permanent
from worker.pipeline.context import PipelineContext
from worker.pipeline.effects import holding, read_pending, remember_staged, safe_error, seconds_between
from worker.pipeline.preflight import check_run_references, check_spec_references, integration_records, run_specs
from worker.pipeline.runs import RUNS, audit, load_run, run_state, transition
from worker.pipeline.steps.common import (Snapshot, StepOutcome, attach, hand_over, load_snapshot, move_on,
                                          notify_run)
from worker.pipeline.steps.minted import MintedKey, minted_keys, record_discarded, record_minted
from worker.pipeline.steps.provider import deprecated_error, provider_for, revoke_key
from worker.providers.base import Provider, issued_name
from worker.pipeline.steps.versions import ensure_old_version, record_new_version
from worker.protocol import Mode, RunState, Step
from worker.secret import Secret
from worker.vault.errors import VaultError, VaultUnavailable
from worker.vault.store import StoredSecret
from worker.adoption import rotation_blocker
from worker.inventory.snapshot import assisted_timings, create_url, document_for
from worker.notice_text import deposit_detail
from worker.owner_notices import contact_of, notify_owner

logger = log.get_logger("keyrotor.pipeline")
S = RunState


def _not_before_delay(snap: Snapshot) -> Optional[float]:
    if snap.run.not_before is None:
        return None
    wait = seconds_between(as_utc(snap.run.not_before), utcnow())
    return wait if wait > 0 else None


def issue(ctx: PipelineContext, run_id: str) -> Optional[StepOutcome]:
    """requested → issued: mint the new credential and stage it in Vault. Calls whose outcome is
    unknown are settled first: staging is adopted only when it holds a key this run minted and
    did not discard; minted keys whose secret never reached staging are revoked; and after an
    issue call that failed without a definite answer, the provider's keys named after the run are
    listed (once the call can no longer be in flight) and revoked before issuing again."""
    snap = load_snapshot(ctx, run_id, Step.issue)
    if snap is None:
        return None
    wait = _not_before_delay(snap)
    if wait is not None:
        return StepOutcome(state=S.requested, mode=snap.mode, again_in_s=wait)
    name = issued_name(snap.run.id)
    served = _served_once(ctx, snap)
    specs: list[tuple[str, Any]] = []
    blocker: Optional[str] = None
    marked: Optional[datetime] = None
    # One transaction reads what the step needs before any effect (minted keys, the references to
    # resolve, what would block the rotation); Vault is read inside it only when staging or the
    # served key must be looked at. When nothing stands between it and the issue call, it also
    # marks the run for that call (``_mint``), so the mark costs no transaction of its own.
    with session_scope(ctx.engine) as session:
        attach(session, snap)
        minted = minted_keys(session, snap.run.id)
        staged = _trusted_staging(ctx, snap, minted)
        if staged is None:
            # Kept for propagate and verify of this chain: their integration factory asks nothing.
            snap.integration_records = integration_records(session, snap.key)
            specs = run_specs(session, snap.key, snap.provider_record, snap.integration_records)
            blocker = rotation_blocker(session, snap.key, ctx.vault, served=served)
            # Nothing issued yet: a broken reference fails the run before any effect (the
            # transaction only read, so nothing is lost when it rolls back).
            check_spec_references(ctx, snap.key, specs)
            if blocker is not None:  # the current key could never be revoked afterwards
                raise ConfigError(blocker + "; nothing was issued")
        provider = provider_for(ctx, snap)
        if staged is None and _issues_next(snap, provider, minted):
            marked = utcnow()
            _mark_issue_unknown(session, snap.run.id, marked)
    expires_at = None
    recovered = staged is not None
    if staged is not None:  # a previous attempt issued and staged, then crashed before recording
        secret, key_id = staged
        expires_at = ctx.vault.pending_expiry(snap.run.id)
    else:
        _discard_lost(ctx, snap, provider, minted, name)
        wait = _settle_unknown_issue(ctx, snap, provider, minted, name)
        if wait is not None:
            return StepOutcome(state=S.requested, mode=snap.mode, again_in_s=wait)
        if not provider.can_issue:
            raise PermanentError(f"provider {snap.key.provider!r} cannot issue keys; set its mode to 'assisted'")
        issued = _mint(ctx, snap, provider, name, marked=marked)
        secret, key_id, expires_at = issued.secret, issued.key_id, issued.expires_at
        with holding(secret):
            _stage(ctx, snap, provider, secret, key_id, expires_at)
        remember_staged(snap.run.id, secret, key_id)

    detail = {"fingerprint": secret.fingerprint, "provider_key_id": key_id, "recovered_from_staging": recovered}
    if snap.mode == Mode.cutover:
        detail["cutover_window"] = "opened: the provider invalidated the previous key"
    with session_scope(ctx.engine) as session:
        attach(session, snap)
        old = ensure_old_version(ctx, snap, session, served=served)
        old_id = old.id if old is not None else None
        new_id = record_new_version(session, snap, secret=secret, key_id=key_id, name=name, expires_at=expires_at,
                                    old=old)
        following = move_on(ctx, session, snap, S.issued, detail=detail, old_version_id=old_id, new_version_id=new_id)
    hand_over(snap, following)
    logger.info("run.transition", from_state="requested", to_state="issued", fingerprint=secret.fingerprint)
    return StepOutcome(state=S.issued, mode=snap.mode)


def _served_once(ctx: PipelineContext, snap: Snapshot) -> Callable[[], Optional[StoredSecret]]:
    """What Vault serves for the key, read on first use and then remembered for this step (the
    check before issuing and the old version recorded after it read it once)."""
    read: list[Optional[StoredSecret]] = []

    def served() -> Optional[StoredSecret]:
        if not read:
            key = snap.key
            read.append(ctx.vault.read_current(key.vault_mount, key.vault_path, key.vault_field))
        return read[0]

    return served


def _trusted_staging(ctx: PipelineContext, snap: Snapshot, minted: list[MintedKey]) -> Optional[tuple[Secret, Optional[str]]]:
    """What staging holds, if it is a key this run minted and has not discarded. Anything else (a
    timed-out staging write of a key revoked since, landing late) is cleared and recorded."""
    if not minted:  # staging is written only after the minted key is recorded: nothing to look for
        return None
    staged = read_pending(ctx.vault, snap.run.id)
    if staged is None:
        return None
    secret, key_id = staged
    known = next((m for m in minted if m.fingerprint == secret.fingerprint), None)
    if known is not None and not known.discarded:
        remember_staged(snap.run.id, secret, key_id)
        return staged
    reason = "a key this run discarded" if known is not None else "not a key this run minted"
    ctx.vault.discard_pending(snap.run.id)
    with session_scope(ctx.engine) as session:
        audit(session, snap.run, actor=ctx.actor, event="staging_rejected",
              detail={"fingerprint": secret.fingerprint, "provider_key_id": key_id, "reason": reason})
    logger.warning("staging.rejected", fingerprint=secret.fingerprint, provider_key_id=key_id, reason=reason)
    return None


def _discard_lost(ctx: PipelineContext, snap: Snapshot, provider: Provider, minted: list[MintedKey], name: str) -> None:
    """Keys this run minted whose secret is not in staging can never be used: clear staging first
    (a held write landing later is then rejected by its fingerprint), then revoke them."""
    lost = [m for m in minted if not m.discarded]
    if not lost:
        return
    ctx.vault.discard_pending(snap.run.id)
    for key in lost:
        revocation = "manual"
        if key.provider_key_id is not None:
            revocation = revoke_key(provider, key_id=key.provider_key_id, secret=None, credential_type=snap.credential_type)
        if revocation == "manual":
            _record_lost_orphan(ctx, snap, key.provider_key_id, name)
        with session_scope(ctx.engine) as session:
            record_discarded(session, snap.run, actor=ctx.actor, fingerprint=key.fingerprint,
                             provider_key_id=key.provider_key_id, revocation=revocation,
                             reason="its secret never reached staging")


def _settle_unknown_issue(ctx: PipelineContext, snap: Snapshot, provider: Provider, minted: list[MintedKey],
                          name: str) -> Optional[float]:
    """After an issue call without a definite answer: wait until it can no longer be in flight
    (twice the provider's request timeout from its start), then list the keys named after the run
    and revoke each (its secret is lost). Returns seconds to wait, or ``None`` to go on. Without a
    list call nothing can be found: the call was recorded (``issue_outcome_unknown``, with the
    name) when it failed, and ``plan``/``status`` say that this provider has no orphan scan."""
    since = as_utc(snap.run.issue_unknown_since)
    if since is None or not provider.can_list:
        return None
    settle_at = since + timedelta(seconds=2 * float(getattr(provider, "issue_timeout_s", 0.0) or 0.0))
    wait = seconds_between(settle_at, utcnow())
    if wait > 0:
        return wait
    settled = {m.provider_key_id for m in minted if m.discarded}
    for info in provider.list_keys():
        key_id = getattr(info, "key_id", None)
        if getattr(info, "name", None) != name or getattr(info, "live", None) is False or key_id in settled:
            continue
        revocation = "manual"
        if key_id is not None:
            revocation = revoke_key(provider, key_id=key_id, secret=None, credential_type=snap.credential_type)
        if revocation == "manual":
            _record_lost_orphan(ctx, snap, key_id, name)
        with session_scope(ctx.engine) as session:
            audit(session, snap.run, actor=ctx.actor, event="stray_key_found",
                  detail={"name": name, "provider_key_id": key_id, "revocation": revocation,
                          "reason": "minted by an issue call whose answer was lost"})
        logger.warning("issue.stray_key", provider_key_id=key_id, revocation=revocation)
    return None


def _issues_next(snap: Snapshot, provider: Provider, minted: list[MintedKey]) -> bool:
    """Whether ``issue`` goes straight to the issue call: no minted key to discard, no earlier
    call to settle, a provider that issues. (Then the reads' transaction marks the run for it.)"""
    return (provider.can_issue and snap.run.issue_unknown_since is None
            and all(m.discarded for m in minted))


_STATEMENTS = DirectStatements()


def _mark_statement() -> Any:
    return (update(RUNS).where(RUNS.c.id == bindparam("run_id"), RUNS.c.state == bindparam("requested", S.requested.value))
            .values(issue_unknown_since=bindparam("since", type_=RUNS.c.issue_unknown_since.type)).returning(RUNS.c.id))


def _mark_issue_unknown(session: Any, run_id: str, since: Optional[datetime]) -> None:
    direct.fetch(session, _STATEMENTS, "mark", _mark_statement, {"run_id": run_id, "since": since})


def _set_issue_unknown(ctx: PipelineContext, run_id: str, since: Optional[datetime],
                       event: Optional[dict[str, Any]] = None) -> None:
    """Mark (or clear) "an issue call's outcome is unknown since …" on the run; with ``event``,
    also record the failed call in the audit trail."""
    with session_scope(ctx.engine) as session:
        _mark_issue_unknown(session, run_id, since)
        if event is not None:
            run = load_run(session, run_id)
            if run is not None:
                audit(session, run, actor=ctx.actor, event="issue_outcome_unknown", detail=event)


def _answer_is_definite(exc: BaseException) -> bool:
    """The provider answered and refused (4xx, 429, deprecated): no key was minted. Timeouts,
    connection errors, 5xx, garbage answers, interrupts: a key may have been minted."""
    return is_permanent(exc) or isinstance(exc, RateLimited)


def _mint(ctx: PipelineContext, snap: Snapshot, provider: Provider, name: str, *,
          marked: Optional[datetime] = None) -> Any:
    """The issue call, bracketed: the run is marked before it (a crash mid-call leaves the mark),
    and its answer is recorded (``new_key_minted``) before the secret goes anywhere else.
    ``marked``: when the caller's committed transaction marked it already, milliseconds before
    the call (the wait before listing the provider's keys, twice the request timeout from the
    mark, still outlasts a call that can run for one timeout)."""
    started = marked
    if started is None:
        started = utcnow()
        _set_issue_unknown(ctx, snap.run.id, started)
    try:
        issued = provider.issue(name=name, credential_type=snap.credential_type, labels=dict(snap.key.labels or {}))
    except BaseException as exc:
        if _answer_is_definite(exc):
            _set_issue_unknown(ctx, snap.run.id, None)
            if isinstance(exc, DeprecatedCredential):
                raise deprecated_error(ctx, snap, "issue") from None
        else:
            _set_issue_unknown(ctx, snap.run.id, started, event={
                "name": name, "error": safe_error(exc), "listable": provider.can_list})
        raise
    with holding(issued.secret), statement_scope(ctx.engine) as connection:
        record_minted(connection, snap.run, actor=ctx.actor, name=name, fingerprint=issued.secret.fingerprint,
                      provider_key_id=issued.key_id)
    return issued


def _stage(ctx: PipelineContext, snap: Snapshot, provider: Provider, secret: Secret, key_id: Optional[str],
           expires_at: Optional[datetime]) -> None:
    """Stage the new secret. The store already retries transient Vault errors (bounded, backoff,
    jitter, Retry-After); a second layer here would multiply its attempts. On failure the key is
    revoked only when the write is known not to have landed: Vault refused it, or staging was read
    back without it and cleared. Otherwise the next attempt adopts it from staging or settles it."""
    try:
        ctx.vault.stage_pending(snap.run.id, secret, key_id, expires_at)
        return
    except BaseException as exc:
        if not _refused(exc):
            landed = _staging_landed(ctx, snap.run.id, secret)
            if landed:
                logger.info("staging.landed_despite_error", error=safe_error(exc))
                return
            if landed is None:
                raise
        # Not in cutover: there the new key is the only valid one, so the next attempt settles it.
        if snap.mode != Mode.cutover:
            _revoke_unstaged(ctx, snap, provider, secret, key_id)
        raise


def _refused(exc: BaseException) -> bool:
    """Vault answered and refused the write (4xx): it did not land."""
    return isinstance(exc, VaultError) and not isinstance(exc, VaultUnavailable)


def _staging_landed(ctx: PipelineContext, run_id: str, secret: Secret) -> Optional[bool]:
    """After a staging write without a definite answer: ``True`` if staging holds it, ``False`` if
    staging was read without it and then cleared, ``None`` if Vault cannot tell us now."""
    try:
        staged = read_pending(ctx.vault, run_id)
        if staged is not None and staged[0].fingerprint == secret.fingerprint:
            return True
        ctx.vault.discard_pending(run_id)
        return False
    except Exception as exc:
        logger.warning("staging.outcome_unknown", error=safe_error(exc))
        return None


def _revoke_unstaged(ctx: PipelineContext, snap: Snapshot, provider: Provider, secret: Secret, key_id: Optional[str]) -> None:
    """Revoke a key that never reached staging and record it as discarded (best effort: if this
    fails, the next attempt finds it minted and not discarded, and revokes it then)."""
    try:
        revocation = revoke_key(provider, key_id=key_id, secret=secret, credential_type=snap.credential_type)
        with session_scope(ctx.engine) as session:
            record_discarded(session, snap.run, actor=ctx.actor, fingerprint=secret.fingerprint, provider_key_id=key_id,
                             revocation=revocation, reason="staging the secret failed")
    except Exception as exc:
        logger.error("revoke.failed", provider_key_id=key_id, error=safe_error(exc))


def _record_lost_orphan(ctx: PipelineContext, snap: Snapshot, key_id: Optional[str], name: str) -> None:
    """The provider holds our key but its secret was lost before staging: record it so that
    compensation revokes it, and fail (issuing a second key for the run is not allowed)."""
    with session_scope(ctx.engine) as session:
        run = load_run(session, snap.run.id)
        if run is None or run_state(run) != S.requested:
            raise StateConflict(f"run {snap.run.id} moved on while recovering its issued key")
        if run.new_version_id is None:
            run.new_version_id = record_new_version(session, snap, secret=None, key_id=key_id, name=name, expires_at=None)
            session.add(run)
    raise PermanentError(f"the provider already holds key {name} (id {key_id}) but its secret was lost before "
                         "it reached Vault; compensating revokes it and the next run issues a fresh key")



def request_deposit(ctx: PipelineContext, run_id: str) -> Optional[StepOutcome]:
    """assisted: requested → awaiting_deposit; the key's owner is told what to create, where, and
    how to hand it over (their deposit path in Vault; ``worker/service/deposits.py`` picks it up)."""
    snap = load_snapshot(ctx, run_id, Step.request_deposit)
    if snap is None:
        return None
    wait = _not_before_delay(snap)
    if wait is not None:
        return StepOutcome(state=S.requested, mode=snap.mode, again_in_s=wait)
    check_run_references(ctx, snap.key)
    document = document_for(ctx.engine, [snap.key.name], [snap.key.provider])
    deadline = utcnow() + assisted_timings(document, snap.key.name).deposit_deadline
    path = ctx.vault.deposit_path(snap.key.name)
    detail = deposit_detail(provider=snap.key.provider, credential_type=snap.credential_type, owner=snap.key.owner,
                            contact=contact_of(document, snap.key.name), mount=ctx.vault.staging_mount, path=path,
                            create_url=create_url(document, snap.key.provider, snap.credential_type), run_id=snap.run.id,
                            deadline_at=deadline.isoformat())
    with session_scope(ctx.engine) as session:
        old = ensure_old_version(ctx, snap, session)
        old_id = old.id if old is not None else None
        transition(session, snap.run, S.awaiting_deposit, actor=ctx.actor, deadline_s=None, old_version_id=old_id,
                   detail={"owner": snap.key.owner, "contact": detail["contact"],
                           "deposit_path": f"{ctx.vault.staging_mount}/{path}",
                           "command": f"keyrotor deposit {snap.run.id}"}, refresh=False)
    notify_run(ctx, "started", snap, {"action": "deposit_required", "owner": snap.key.owner,
                                   "credential_type": snap.credential_type, "next_step": detail["next_step"]})
    notify_owner(ctx.engine, "deposit_requested", key_name=snap.key.name, run_id=snap.run.id, detail=detail,
                 vault=ctx.vault)
    return StepOutcome(state=S.awaiting_deposit, mode=snap.mode)
