"""The effects of each protocol step. One function per step, each idempotent:

1. load a snapshot of the run; if it is not in the state this step acts on → skip (a duplicate or
   late message is harmless);
2. do the effect so that doing it twice changes nothing (look before issuing, compare
   fingerprints before writing Vault, skip sinks already pushed …);
3. move the run on with a conditional UPDATE (``runs.transition``), with its audit event and the
   version bookkeeping in the same transaction.

A step returns a ``StepOutcome`` (the state it reached, or "run me again in N seconds") and
raises ``TransientError``/``PermanentError`` on failure; ``execute`` turns failures into retries or
into the protocol's failure path. Secrets are read from Vault into memory only for the duration
of a step (``holding``); only fingerprints and provider key ids are written anywhere else.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Optional

from sqlmodel import Session

from worker import log
from worker.clock import as_utc, utcnow
from worker.db.models import KeyVersion, ManagedKey, ProviderRecord, RotationRun, SinkDelivery, VersionStage
from worker.db.session import session_scope
from worker.errors import DeprecatedCredential, PermanentError, StateConflict, TransientError
from worker.metrics import DEAD_LETTERS, PROVIDER_REQUESTS, ROTATIONS, STEP_DURATION, STEP_FAILURES
from worker.pipeline import retries
from worker.pipeline.context import PipelineContext
from worker.pipeline.deprecation import (
    DEPRECATED_TYPE_FIELD,
    NewCredentialDeprecated,
    deprecated_failure_type,
    new_credential_deprecated,
    replacement_of,
    report_deprecated,
)
from worker.pipeline.lease import Lease, LeaseHeld, current_lease
from worker.pipeline.effects import (
    announcement,
    enum_value,
    holding,
    parse_seconds,
    read_pending,
    safe_error,
    seconds_between,
    verify_status,
)
from worker.pipeline.runs import audit, load_key, load_run, load_version, note_attempt, run_state, transition
from worker.protocol import (
    FailureKind,
    Mode,
    RunState,
    Step,
    expected_state,
    failure_target,
    has_grace_period,
    next_step,
    parse_mode,
)
from worker.protocol.states import OUTCOME_STATES, WAITING_STATES
from worker.secret import Secret

logger = log.get_logger("keyrotor.pipeline")
S = RunState


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class StepOutcome:
    state: RunState              # where the run is after the step
    mode: Mode
    again_in_s: Optional[float] = None   # run this same step again after this delay (polling, grace)
    next_in_s: float = 0.0               # delay before the next step


@dataclass(frozen=True)
class Action:
    """What the caller (a Dramatiq actor or the inline driver) must do after a step ran."""

    step: Optional[Step] = None   # send this step for the run ...
    delay_ms: int = 0             # ... after this delay
    retry: bool = False           # re-deliver the same message (counts against the retry budget)


@dataclass
class Snapshot:
    run: RotationRun
    key: ManagedKey
    old: Optional[KeyVersion]
    new: Optional[KeyVersion]
    mode: Mode

    @property
    def credential_type(self) -> str:
        return self.run.target_credential_type or self.key.credential_type


class RunMissing(TransientError):
    """The message names a run this worker cannot read: the producer's commit may still be in
    flight (or reach this database replica later), so the message is retried a few times."""


def _snapshot(ctx: PipelineContext, run_id: str, step: Step) -> Optional[Snapshot]:
    """Load the run if it is in the state ``step`` acts on, and claim its lease (``execute`` set
    one up) before the step does anything outside the database."""
    lease = current_lease.get()
    with session_scope(ctx.engine) as session:
        run = load_run(session, run_id)
        if run is None:
            raise RunMissing(f"run {run_id} is not in the database (yet)")
        state = run_state(run)
        if state != expected_state(step):
            logger.info("step.skipped", reason="run is not in the state this step acts on",
                        state=state.value, expected=expected_state(step).value)
            return None
        if lease is not None:
            lease.acquire(session, state.value)
        key = load_key(session, run)
        log.bind(key=key.name)
        snap = Snapshot(run=run, key=key, old=load_version(session, run.old_version_id),
                        new=load_version(session, run.new_version_id), mode=parse_mode(run.mode))
    if lease is not None:
        lease.start_renewing()
    return snap


def _deadline_s(ctx: PipelineContext, to: RunState, delay_s: float = 0.0) -> Optional[float]:
    """When the reconciler may re-enqueue a run that did not move (None: it waits for a person)."""
    if to in WAITING_STATES or to in OUTCOME_STATES:
        return None
    return delay_s + 2 * ctx.policy.time_limit_ms / 1000


def _advance(ctx: PipelineContext, snap: Snapshot, to: RunState, *, detail: Optional[dict[str, Any]] = None,
             delay_s: float = 0.0, apply: Optional[Callable[[Session], None]] = None, **fields: Any) -> StepOutcome:
    """Apply version bookkeeping and the conditional transition in one transaction."""
    with session_scope(ctx.engine) as session:
        if apply is not None:
            apply(session)
        transition(session, snap.run, to, actor=ctx.actor, detail=detail,
                   deadline_s=_deadline_s(ctx, to, delay_s), **fields)
    logger.info("run.transition", from_state=run_state(snap.run).value, to_state=to.value, **(detail or {}))
    if to in OUTCOME_STATES:
        ROTATIONS.labels(provider=snap.key.provider, outcome=to.value).inc()
    return StepOutcome(state=to, mode=snap.mode, next_in_s=delay_s)


def _provider(ctx: PipelineContext, snap: Snapshot) -> Any:
    with session_scope(ctx.engine) as session:
        return ctx.provider_factory(session, snap.key)


def _call(provider: Any, call: str, fn: Callable[[], Any]) -> Any:
    """Call the provider, counting it by outcome (labels carry no key id or secret)."""
    name = getattr(provider, "name", "unknown")
    try:
        result = fn()
    except BaseException as exc:
        PROVIDER_REQUESTS.labels(provider=name, call=call, status=type(exc).__name__).inc()
        raise
    PROVIDER_REQUESTS.labels(provider=name, call=call, status="ok").inc()
    return result


def _check(provider: Any, secret: Secret, credential_type: str) -> str:
    return enum_value(_call(provider, "check", lambda: provider.check(secret, credential_type=credential_type)))


def _notify(ctx: PipelineContext, event: str, snap: Snapshot, detail: dict[str, Any]) -> None:
    if ctx.notify is None:
        if event in ("needs_attention", "failed", "rolled_back"):
            logger.error("run.alert", alert=event, **detail)
        return
    try:
        ctx.notify(event, key_name=snap.key.name, run_id=snap.run.id, detail=detail)
    except Exception as exc:  # a failed notification never breaks the pipeline
        logger.error("notify.failed", alert=event, error=safe_error(exc))


def _activation(ctx: PipelineContext, snap: Snapshot) -> tuple[float, float]:
    with session_scope(ctx.engine) as session:
        record = session.get(ProviderRecord, snap.key.provider)
        spec = (record.spec or {}).get("activation") or {} if record is not None else {}
    return (parse_seconds(spec.get("poll_interval"), ctx.policy.activation_poll_s),
            parse_seconds(spec.get("timeout"), ctx.policy.activation_timeout_s))


def _ensure_old_version(ctx: PipelineContext, snap: Snapshot, session: Session) -> Optional[int]:
    """The version Vault serves now, as a ``current`` KeyVersion (adopted if the DB has none)."""
    key = snap.key
    stored = ctx.vault.read_current(key.vault_mount, key.vault_path, key.vault_field)
    if stored is None:
        return None
    fp = stored.secret.fingerprint
    known = session.exec(
        _select_versions(key.id, VersionStage.current)  # type: ignore[arg-type]
    ).all()
    for version in known:
        if version.fingerprint == fp:
            if version.vault_version != stored.version:
                version.vault_version = stored.version
                session.add(version)
            return version.id
    adopted = KeyVersion(key_id=key.id, run_id=None, credential_type=key.credential_type, stage=VersionStage.current,
                         provider_key_id=stored.provider_key_id, fingerprint=fp, vault_version=stored.version,
                         issued_at=None)
    for version in known:  # the DB's idea of "current" was changed out of band
        version.stage = VersionStage.previous
        session.add(version)
    session.add(adopted)
    session.flush()
    audit(session, snap.run, actor=ctx.actor, event="version_adopted",
          detail={"fingerprint": fp, "vault_version": stored.version, "provider_key_id": stored.provider_key_id})
    return adopted.id


def _select_versions(key_id: int, stage: VersionStage) -> Any:
    from sqlmodel import select

    return select(KeyVersion).where(KeyVersion.key_id == key_id, KeyVersion.stage == stage.value)


def _record_new_version(session: Session, snap: Snapshot, *, secret: Optional[Secret], key_id: Optional[str],
                        name: Optional[str], expires_at: Any) -> int:
    version = KeyVersion(key_id=snap.key.id, run_id=snap.run.id, credential_type=snap.credential_type,
                         stage=VersionStage.pending, provider_key_id=key_id, provider_key_name=name,
                         fingerprint=secret.fingerprint if secret is not None else None, issued_at=utcnow(),
                         expires_at=expires_at)
    session.add(version)
    session.flush()
    assert version.id is not None
    return version.id


def _not_before_delay(snap: Snapshot) -> Optional[float]:
    if snap.run.not_before is None:
        return None
    wait = seconds_between(as_utc(snap.run.not_before), utcnow())  # type: ignore[arg-type]
    return wait if wait > 0 else None


# --------------------------------------------------------------------------- steps
def issue(ctx: PipelineContext, run_id: str) -> Optional[StepOutcome]:
    """requested → issued: mint the new credential (never twice per run) and stage it in Vault."""
    snap = _snapshot(ctx, run_id, Step.issue)
    if snap is None:
        return None
    wait = _not_before_delay(snap)
    if wait is not None:
        return StepOutcome(state=S.requested, mode=snap.mode, again_in_s=wait)
    provider = _provider(ctx, snap)
    name = f"keyrotor-{snap.run.id}"
    staged = read_pending(ctx.vault, snap.run.id)
    expires_at = None
    recovered = staged is not None
    if staged is not None:  # a previous attempt issued and staged, then crashed before recording
        secret, key_id = staged
    else:
        if getattr(provider, "can_list", False):
            orphan = next((k for k in _call(provider, "list", provider.list_keys) if getattr(k, "name", None) == name), None)
            if orphan is not None:
                _record_lost_orphan(ctx, snap, getattr(orphan, "key_id", None), name)
        if not getattr(provider, "can_issue", True):
            raise PermanentError(f"provider {snap.key.provider!r} cannot issue keys; set its mode to 'assisted'")
        try:
            issued = _call(provider, "issue", lambda: provider.issue(name=name, credential_type=snap.credential_type,
                                                                     labels=dict(snap.key.labels or {})))
        except DeprecatedCredential:
            raise _new_deprecated(ctx, snap, "issue") from None
        secret, key_id, expires_at = issued.secret, issued.key_id, issued.expires_at
        with holding(secret):
            try:
                # The secret exists only in this process's memory until staged. The store already
                # retries transient Vault errors (bounded, backoff, jitter, Retry-After); a second
                # layer here would multiply its attempts, so one call, and on failure the key is
                # revoked and the step's own (Dramatiq) retry issues a fresh one.
                ctx.vault.stage_pending(snap.run.id, secret, key_id)
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
                   deadline_s=_deadline_s(ctx, S.issued), old_version_id=old_id, new_version_id=new_id)
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
        _call(provider, "revoke", lambda: provider.revoke(key_id=key_id, secret=secret, credential_type=credential_type))
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
    with session_scope(ctx.engine) as session:
        old_id = _ensure_old_version(ctx, snap, session)
        transition(session, snap.run, S.awaiting_deposit, actor=ctx.actor, deadline_s=None, old_version_id=old_id,
                   detail={"owner": snap.key.owner, "command": f"keyrotor deposit {snap.run.id}"})
    _notify(ctx, "started", snap, {"action": "deposit_required", "owner": snap.key.owner,
                                   "command": f"keyrotor deposit {snap.run.id}",
                                   "credential_type": snap.credential_type})
    return StepOutcome(state=S.awaiting_deposit, mode=snap.mode)


def precheck(ctx: PipelineContext, run_id: str) -> Optional[StepOutcome]:
    """issued → prechecked: poll the provider with the new key until it is live or the deadline."""
    snap = _snapshot(ctx, run_id, Step.precheck)
    if snap is None:
        return None
    staged = read_pending(ctx.vault, snap.run.id)
    if staged is None:
        raise PermanentError(f"the staged secret of run {snap.run.id} is missing from Vault; cannot check it")
    secret, _ = staged
    provider = _provider(ctx, snap)
    with holding(secret):
        outcome = _check(provider, secret, snap.credential_type)
    if outcome == "valid":
        return _advance(ctx, snap, S.prechecked, detail={"fingerprint": secret.fingerprint})
    if outcome == "deprecated":  # waiting will not make a deprecated type acceptable
        raise _new_deprecated(ctx, snap, "precheck")
    poll_s, timeout_s = _activation(ctx, snap)
    elapsed = seconds_between(utcnow(), snap.new.issued_at if snap.new else snap.run.updated_at)
    if elapsed < timeout_s:
        return StepOutcome(state=S.issued, mode=snap.mode, again_in_s=poll_s)
    raise PermanentError(f"the new credential is still {outcome} at the provider {elapsed:.0f}s after it was "
                         f"issued (activation timeout {timeout_s:.0f}s)")


def promote(ctx: PipelineContext, run_id: str) -> Optional[StepOutcome]:
    """prechecked → promoted: write the new secret as the newest Vault version (check-and-set)."""
    snap = _snapshot(ctx, run_id, Step.promote)
    if snap is None:
        return None
    staged = read_pending(ctx.vault, snap.run.id)
    if staged is None:
        raise PermanentError(f"the staged secret of run {snap.run.id} is missing from Vault; cannot promote it")
    secret, key_id = staged
    key = snap.key
    with holding(secret):
        current = ctx.vault.read_current(key.vault_mount, key.vault_path, key.vault_field)
        if current is not None and current.secret == secret:
            version = current.version  # promoted by an attempt that crashed before recording it
        else:
            expected = snap.old.vault_version if snap.old is not None else None
            version = ctx.vault.promote(key.vault_mount, key.vault_path, key.vault_field, secret, key_id, expected)
    now = utcnow()

    def apply(session: Session) -> None:
        new = load_version(session, snap.run.new_version_id)
        assert new is not None
        new.stage, new.vault_version, new.promoted_at = VersionStage.current, version, now
        session.add(new)
        old = load_version(session, snap.run.old_version_id)
        if old is not None:
            old.stage = VersionStage.previous if snap.mode != Mode.cutover else VersionStage.retired
            if snap.mode == Mode.cutover:
                old.retired_at = now
            session.add(old)

    detail: dict[str, Any] = {"vault_version": version, "fingerprint": secret.fingerprint}
    if snap.mode == Mode.cutover and snap.new is not None:
        detail["cutover_window_ms"] = int(seconds_between(now, snap.new.issued_at) * 1000)
    return _advance(ctx, snap, S.promoted, detail=detail, apply=apply)


def _announcement(snap: Snapshot, event: str, secret: Secret, version: KeyVersion, vault_version: int) -> Any:
    return announcement(event=event, key_name=snap.key.name, run_id=snap.run.id,
                        provider_key_id=version.provider_key_id, fingerprint=secret.fingerprint,
                        vault_mount=snap.key.vault_mount, vault_path=snap.key.vault_path,
                        vault_field=snap.key.vault_field, vault_version=vault_version, secret=secret)


def _push_all(ctx: PipelineContext, snap: Snapshot, ann: Any, *, done_status: str, skip: set[str]) -> list[tuple[str, BaseException]]:
    """Push ``ann`` to every integration of the key not yet done; record each sink's status."""
    failures: list[tuple[str, BaseException]] = []
    for name in snap.key.integrations or []:
        with session_scope(ctx.engine) as session:
            row = _sink_row(session, snap.run.id, name)
            if row.status in skip and row.fingerprint == ann.fingerprint:
                continue
            try:
                ctx.integration_factory(session, name).push(ann)
            except Exception as exc:
                row.status, row.last_error = "failed", safe_error(exc)
                failures.append((name, exc))
                logger.warning("sink.push_failed", integration=name, error=row.last_error)
            else:
                row.status, row.last_error = done_status, None
            row.fingerprint, row.attempts, row.updated_at = ann.fingerprint, row.attempts + 1, utcnow()
            session.add(row)
    return failures


def _sink_row(session: Session, run_id: str, name: str) -> SinkDelivery:
    from sqlmodel import select

    row = session.exec(select(SinkDelivery).where(SinkDelivery.run_id == run_id, SinkDelivery.integration == name)).first()
    if row is None:
        row = SinkDelivery(run_id=run_id, integration=name, status="pending", attempts=0, updated_at=utcnow())
        session.add(row)
        session.flush()
    return row


def _raise_sink_failures(failures: list[tuple[str, BaseException]], what: str) -> None:
    names = ", ".join(name for name, _ in failures)
    first = safe_error(failures[0][1])
    if any(isinstance(exc, PermanentError) for _, exc in failures):
        raise PermanentError(f"{what} failed permanently at {names}: {first}")
    waits = [getattr(exc, "retry_after", None) for _, exc in failures]
    retry_after = max((w for w in waits if w is not None), default=None)
    raise TransientError(f"{what} failed at {names} (will retry those only): {first}", retry_after=retry_after)


def propagate(ctx: PipelineContext, run_id: str) -> Optional[StepOutcome]:
    """promoted → propagated: push to every integration; all must succeed (no split brain)."""
    snap = _snapshot(ctx, run_id, Step.propagate)
    if snap is None:
        return None
    staged = read_pending(ctx.vault, snap.run.id)
    if staged is None or snap.new is None:
        raise PermanentError(f"the staged secret of run {snap.run.id} is missing from Vault; cannot propagate it")
    secret, _ = staged
    with holding(secret):
        ann = _announcement(snap, "rotated", secret, snap.new, snap.new.vault_version or 0)
        failures = _push_all(ctx, snap, ann, done_status="pushed", skip={"pushed", "verified"})
    if failures:
        _raise_sink_failures(failures, "pushing the new key")
    return _advance(ctx, snap, S.propagated, detail={"sinks": list(snap.key.integrations or [])})


def verify(ctx: PipelineContext, run_id: str) -> Optional[StepOutcome]:
    """propagated → verified: the provider and every integration accept the new key; grace starts."""
    snap = _snapshot(ctx, run_id, Step.verify)
    if snap is None:
        return None
    staged = read_pending(ctx.vault, snap.run.id)
    if staged is None or snap.new is None:
        raise PermanentError(f"the staged secret of run {snap.run.id} is missing from Vault; cannot verify it")
    secret, _ = staged
    provider = _provider(ctx, snap)
    results: dict[str, str] = {}
    with holding(secret):
        outcome = _check(provider, secret, snap.credential_type)
        if outcome == "deprecated":
            raise _new_deprecated(ctx, snap, "verify")
        if outcome != "valid":
            raise PermanentError(f"the provider now answers {outcome!r} for the new credential it accepted at precheck")
        ann = _announcement(snap, "rotated", secret, snap.new, snap.new.vault_version or 0)
        mismatched: list[str] = []
        for name in snap.key.integrations or []:
            with session_scope(ctx.engine) as session:
                result = ctx.integration_factory(session, name).verify(ann)
                status, reported = verify_status(result)
                row = _sink_row(session, snap.run.id, name)
                if status == "mismatch":
                    mismatched.append(f"{name} reports {reported or 'another key'}")
                    row.last_error = f"verify: reports {reported}"
                else:
                    row.status, row.last_error = "verified", None
                row.updated_at = utcnow()
                session.add(row)
                results[name] = status
    if mismatched:
        raise TransientError("integrations do not serve the new key yet: " + "; ".join(mismatched))
    grace_s = float(snap.key.grace_period_s) if has_grace_period(snap.mode, emergency=snap.run.emergency) else 0.0
    grace_until = utcnow() + timedelta(seconds=grace_s)
    return _advance(ctx, snap, S.verified, delay_s=grace_s, grace_until=grace_until,
                    detail={"grace_until": grace_until.isoformat(), "grace_s": grace_s, "sinks": results})


def retire(ctx: PipelineContext, run_id: str) -> Optional[StepOutcome]:
    """verified → retired, after the grace period: revoke the old key and confirm it is rejected."""
    snap = _snapshot(ctx, run_id, Step.retire)
    if snap is None:
        return None
    now = utcnow()
    if snap.run.grace_until is not None and now < as_utc(snap.run.grace_until):  # type: ignore[operator]
        return StepOutcome(state=S.verified, mode=snap.mode,
                           again_in_s=seconds_between(as_utc(snap.run.grace_until), now))  # type: ignore[arg-type]
    old, new, key = snap.old, snap.new, snap.key
    if old is None or old.stage == VersionStage.retired.value and snap.mode != Mode.cutover:
        return _advance(ctx, snap, S.retired, detail={"old": None if old is None else "already retired"})
    if new is None:
        raise PermanentError(f"run {snap.run.id} has no new version recorded; refusing to revoke the old key")
    if (old.provider_key_id and old.provider_key_id == new.provider_key_id) or old.fingerprint == new.fingerprint:
        raise PermanentError("the old and new versions are the same credential; refusing to revoke it")
    provider = _provider(ctx, snap)
    staged = read_pending(ctx.vault, snap.run.id)
    new_secret = staged[0] if staged else None
    old_secret: Optional[Secret] = None
    if old.vault_version is not None:
        old_secret = ctx.vault.read_version(key.vault_mount, key.vault_path, key.vault_field, old.vault_version).secret
    detail: dict[str, Any] = {"old_fingerprint": old.fingerprint, "old_provider_key_id": old.provider_key_id}
    with holding(new_secret, old_secret):
        # Invariant 1 and 2: never revoke the old key unless the new one still authenticates.
        new_outcome = _check(provider, new_secret, snap.credential_type) if new_secret is not None else "valid"
        if new_outcome == "deprecated":
            raise _new_deprecated(ctx, snap, "retire")
        if new_outcome != "valid":
            raise PermanentError("the new credential no longer authenticates; the old one is kept")
        old_deprecated = False
        if snap.mode == Mode.cutover:
            detail["revocation"] = "invalidated by issuing the new key"
        elif getattr(provider, "can_revoke", True):
            try:
                _call(provider, "revoke", lambda: provider.revoke(key_id=old.provider_key_id, secret=old_secret,
                                                                  credential_type=old.credential_type))
                detail["revocation"] = "revoked"
            except DeprecatedCredential:
                # The call authenticated with the old credential and the provider rejected it as
                # deprecated: it cannot revoke itself. The check below decides whether it still works.
                old_deprecated = True
                detail["revocation"] = "rejected as deprecated by the provider"
        else:
            detail["revocation"] = "manual"
        if old_secret is not None:
            outcome = _check(provider, old_secret, old.credential_type)
            detail["old_check"] = outcome
            old_deprecated = old_deprecated or outcome == "deprecated"
            if outcome == "valid" and detail["revocation"] != "manual":
                since = seconds_between(now, snap.run.grace_until)
                message = f"the old credential still authenticates {since:.0f}s after revocation"
                if since < ctx.policy.revocation_timeout_s:
                    raise TransientError(message)
                raise PermanentError(message + "; revoke it at the provider by hand")
    if detail["revocation"] == "manual":
        _notify(ctx, "reminder", snap, {"action": "revoke_old_credential", "owner": key.owner,
                                        "old_fingerprint": old.fingerprint})

    def apply(session: Session) -> None:
        row = load_version(session, old.id)
        assert row is not None
        if detail["revocation"] != "manual":
            row.stage, row.retired_at = VersionStage.retired, now
        session.add(row)

    outcome_ = _advance(ctx, snap, S.retired, detail=detail, apply=apply)
    if old_deprecated:  # after the commit: it joins this (still open) run, or is stale once it completes
        report_deprecated(ctx.engine, key_name=key.name, credential_type=old.credential_type, requested_by=ctx.actor)
    return outcome_


def finish(ctx: PipelineContext, run_id: str) -> Optional[StepOutcome]:
    """retired → completed: discard staging, record the rotation on the key, compute its next due."""
    snap = _snapshot(ctx, run_id, Step.finish)
    if snap is None:
        return None
    ctx.vault.discard_pending(snap.run.id)
    now = utcnow()

    def apply(session: Session) -> None:
        key = session.get(ManagedKey, snap.key.id)
        assert key is not None
        key.last_rotated_at, key.updated_at = now, now
        key.expires_at = snap.new.expires_at if snap.new is not None else None
        if snap.run.target_credential_type:
            key.credential_type = snap.run.target_credential_type
        session.add(key)
        session.flush()
        try:
            from jobs.due import refresh_next_due  # type: ignore[import-not-found]
        except ImportError:
            return
        refresh_next_due(session, key)

    outcome = _advance(ctx, snap, S.completed, apply=apply,
                       detail={"fingerprint": snap.new.fingerprint if snap.new else None})
    _notify(ctx, "succeeded", snap, {"fingerprint": snap.new.fingerprint if snap.new else None})
    return outcome


def compensate(ctx: PipelineContext, run_id: str) -> Optional[StepOutcome]:
    """compensating → failed: revoke the *new* key (never the old), discard staging."""
    snap = _snapshot(ctx, run_id, Step.compensate)
    if snap is None:
        return None
    key, new, old = snap.key, snap.new, snap.old
    staged = read_pending(ctx.vault, snap.run.id)
    new_secret, staged_key_id = staged if staged else (None, None)
    new_key_id = (new.provider_key_id if new is not None else None) or staged_key_id
    new_fp = (new.fingerprint if new is not None else None) or (new_secret.fingerprint if new_secret else None)
    detail: dict[str, Any] = {"new_fingerprint": new_fp, "new_provider_key_id": new_key_id}
    with holding(new_secret):
        current = ctx.vault.read_current(key.vault_mount, key.vault_path, key.vault_field)
        if new_fp is not None and current is not None and current.secret.fingerprint == new_fp:
            # Vault already serves the new key (promote crashed before recording): restore instead.
            return _advance(ctx, snap, S.rolling_back, detail={"reason": "Vault already serves the new key"})
        if new_key_id is not None or new_secret is not None:
            if snap.mode == Mode.cutover:
                raise PermanentError("cutover: the new key is the only valid one; it must not be revoked")
            if old is not None and ((old.provider_key_id and old.provider_key_id == new_key_id) or old.fingerprint == new_fp):
                raise PermanentError("the key to revoke is the old credential; refusing (the old key is never revoked on failure)")
            provider = _provider(ctx, snap)
            if getattr(provider, "can_revoke", True):
                _call(provider, "revoke", lambda: provider.revoke(key_id=new_key_id, secret=new_secret,
                                                                  credential_type=snap.credential_type))
                detail["revocation"] = "revoked"
            else:
                detail["revocation"] = "manual"
        ctx.vault.discard_pending(snap.run.id)

    def apply(session: Session) -> None:
        row = load_version(session, snap.run.new_version_id)
        if row is not None:
            row.stage, row.retired_at = VersionStage.failed, utcnow()
            session.add(row)

    outcome = _advance(ctx, snap, S.failed, detail=detail, apply=apply)
    _notify(ctx, "failed", snap, {"reason": snap.run.last_error, **detail})
    _follow_deprecation(ctx, snap)
    return outcome


def rollback(ctx: PipelineContext, run_id: str) -> Optional[StepOutcome]:
    """rolling_back → rolled_back: old secret back as newest Vault version, re-push it, revoke new."""
    snap = _snapshot(ctx, run_id, Step.rollback)
    if snap is None:
        return None
    key, new, old = snap.key, snap.new, snap.old
    if old is None or old.vault_version is None:
        raise PermanentError("there is no previous credential to restore (first rotation of this key)")
    old_secret = ctx.vault.read_version(key.vault_mount, key.vault_path, key.vault_field, old.vault_version).secret
    staged = read_pending(ctx.vault, snap.run.id)
    new_secret = staged[0] if staged else None
    detail: dict[str, Any] = {"restored_fingerprint": old_secret.fingerprint}
    with holding(old_secret, new_secret):
        current = ctx.vault.read_current(key.vault_mount, key.vault_path, key.vault_field)
        if current is not None and current.secret == old_secret:
            restored = current.version
        else:
            restored = ctx.vault.restore(key.vault_mount, key.vault_path, old.vault_version,
                                         current.version if current is not None else 0)
        detail["vault_version"] = restored
        ann = _announcement(snap, "rolled_back", old_secret, old, restored)
        failures = _push_all(ctx, snap, ann, done_status="restored", skip={"restored"})
        if failures:
            _raise_sink_failures(failures, "pushing the restored key")
        new_key_id = new.provider_key_id if new is not None else None
        if new is not None and (new_key_id or new_secret) and new.fingerprint != old.fingerprint:
            provider = _provider(ctx, snap)
            if getattr(provider, "can_revoke", True):
                _call(provider, "revoke", lambda: provider.revoke(key_id=new_key_id, secret=new_secret,
                                                                  credential_type=new.credential_type))
                detail["revocation"] = "revoked"
            else:
                detail["revocation"] = "manual"
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

    outcome = _advance(ctx, snap, S.rolled_back, detail=detail, apply=apply)
    _notify(ctx, "rolled_back", snap, {"reason": snap.run.last_error, **detail})
    _follow_deprecation(ctx, snap)
    return outcome


def _new_deprecated(ctx: PipelineContext, snap: Snapshot, where: str) -> NewCredentialDeprecated:
    return new_credential_deprecated(ctx.engine, provider=snap.key.provider, key_name=snap.key.name,
                                     credential_type=snap.credential_type, where=where)


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


STEPS: dict[Step, Callable[[PipelineContext, str], Optional[StepOutcome]]] = {
    Step.issue: issue,
    Step.request_deposit: request_deposit,
    Step.precheck: precheck,
    Step.promote: promote,
    Step.propagate: propagate,
    Step.verify: verify,
    Step.retire: retire,
    Step.finish: finish,
    Step.compensate: compensate,
    Step.rollback: rollback,
}


# --------------------------------------------------------------------------- failure path
def fail_run(ctx: PipelineContext, run_id: str, step: Step, exc: BaseException, kind: FailureKind) -> Optional[RunState]:
    """Move the run to the protocol's failure target for this step; ``None`` if it moved already."""
    with session_scope(ctx.engine) as session:
        run = load_run(session, run_id)
        if run is None or run_state(run) != expected_state(step):
            return None
        key = load_key(session, run)
        target = failure_target(run.mode, run_state(run), kind)
        error = safe_error(exc)
        detail = {"step": step.value, "failure": kind.value, "error": error}
        if isinstance(exc, NewCredentialDeprecated):
            detail[DEPRECATED_TYPE_FIELD] = exc.credential_type
            detail["replacement"] = exc.replacement
        try:
            # needs_attention keeps the attempt count for the person who looks (resolve resets it).
            kept = {"attempts": run.attempts} if target == S.needs_attention else {}
            transition(session, run, target, actor=ctx.actor, last_error=error, deadline_s=_deadline_s(ctx, target),
                       detail=detail, **kept)
        except StateConflict:
            session.rollback()
            return None
    logger.warning("run.failed_step", failure=kind.value, to_state=target.value, error=error)
    if target in OUTCOME_STATES:
        ROTATIONS.labels(provider=key.provider, outcome=target.value).inc()
    if target == S.needs_attention:
        snap = Snapshot(run=run, key=key, old=None, new=None, mode=parse_mode(run.mode))
        _notify(ctx, "needs_attention", snap, {"step": step.value, "error": error, "failure": kind.value})
    return target


def execute(ctx: PipelineContext, step: Step, run_id: str, *, retry_count: int = 0) -> Action:
    """Run one step for one run and say what to do next. Never raises for expected failures."""
    log.bind(run_id=run_id, step=step.value)
    started = time.monotonic()
    lease = Lease(ctx.engine, run_id, actor=ctx.actor, ttl_s=ctx.policy.lease_ttl_s,
                  max_s=ctx.policy.time_limit_ms / 1000)
    lease_token = current_lease.set(lease)
    try:
        try:
            outcome = STEPS[step](ctx, run_id)
        except RunMissing as exc:
            return _on_missing(ctx, step, run_id, exc, retry_count)
        except LeaseHeld as exc:
            return _on_lease_held(step, exc)
        except StateConflict as exc:
            logger.info("step.conflict", detail=str(exc))
            return Action()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # includes Dramatiq's TimeLimitExceeded (an Interrupt)
            return _on_error(ctx, step, run_id, exc, retry_count)
        if outcome is None:
            return Action()
        if outcome.again_in_s is not None:
            return Action(step=step, delay_ms=int(outcome.again_in_s * 1000))
        following = next_step(outcome.mode, outcome.state)
        return Action(step=following, delay_ms=int(outcome.next_in_s * 1000)) if following else Action()
    finally:
        current_lease.reset(lease_token)
        lease.close()
        STEP_DURATION.labels(step=step.value).observe(time.monotonic() - started)
        log.unbind("run_id", "step", "key")


def _on_missing(ctx: PipelineContext, step: Step, run_id: str, exc: RunMissing, retry_count: int) -> Action:
    """Retry a message for an unreadable run a bounded number of times, then give it up (recorded:
    log line, ``keyrotor_step_failures_total{error="RunMissing"}``, ``keyrotor_dead_letters_total``)."""
    STEP_FAILURES.labels(step=step.value, error=retries.error_label(exc)).inc()
    policy = ctx.policy
    if retry_count < policy.missing_run_retries:
        ceiling = min(policy.missing_run_backoff_ms * 2 ** retry_count, 10_000)
        delay_ms = int(ceiling / 2 + random.uniform(0, ceiling / 2))
        logger.warning("run.missing", run_id=run_id, step=step.value, retry_in_ms=delay_ms, retries=retry_count,
                       detail="not readable yet; the producer's commit may still be in flight")
        return Action(step=step, delay_ms=delay_ms, retry=True)
    DEAD_LETTERS.labels(step=step.value).inc()
    logger.error("run.missing.dropped", run_id=run_id, step=step.value, retries=retry_count,
                 detail="the run never became readable; check that producer and worker use the same database")
    return Action()


def _on_lease_held(step: Step, exc: LeaseHeld) -> Action:
    """Another execution is doing this step now: come back when its lease would lapse (then the
    run has moved on and this message is dropped, or the holder died and this one takes over).
    A fresh message, not a retry: waiting for a live holder must not use up the retry budget."""
    wait_s = seconds_between(exc.until, utcnow()) if exc.until is not None else 1.0
    delay_ms = int(max(0.2, wait_s) * 1000 + random.uniform(0, 500))
    logger.info("step.lease_held", holder=exc.owner, retry_in_ms=delay_ms)
    return Action(step=step, delay_ms=delay_ms)


def _on_error(ctx: PipelineContext, step: Step, run_id: str, exc: BaseException, retry_count: int) -> Action:
    STEP_FAILURES.labels(step=step.value, error=retries.error_label(exc)).inc()
    decision = retries.decide(exc, retry_count, ctx.policy)
    if decision.retry:
        with session_scope(ctx.engine) as session:
            run = load_run(session, run_id)
            if run is None or run_state(run) != expected_state(step):
                return Action()
            note_attempt(session, run, actor=ctx.actor, step=step.value, error=safe_error(exc),
                         delay_s=decision.delay_ms / 1000, time_limit_s=ctx.policy.time_limit_ms / 1000)
        logger.warning("step.retry", error=safe_error(exc), retry_in_ms=decision.delay_ms, retries=retry_count)
        return Action(step=step, delay_ms=decision.delay_ms, retry=True)
    kind = FailureKind.permanent if isinstance(exc, PermanentError) else FailureKind.exhausted
    with session_scope(ctx.engine) as session:
        run = load_run(session, run_id)
        mode = parse_mode(run.mode) if run is not None else Mode.overlap
    target = fail_run(ctx, run_id, step, exc, kind)
    following = next_step(mode, target) if target is not None else None
    return Action(step=following) if following else Action()

