"""The reconciler: recovers runs that stopped moving, and revokes credentials nobody owns.

Stuck runs: the database is the record of where each run is. A run that is not over, not
waiting for a person (``awaiting_deposit``, ``needs_attention``) and not legitimately waiting
for its grace period, whose ``step_deadline_at`` has passed, lost its message or its worker:
it is re-enqueued (``requeues`` + 1, new deadline) — re-running a step is harmless (invariant 7).
After ``max_attempts`` re-enqueues without progress it goes to ``needs_attention`` with an alert;
the old key is untouched. ``requeues`` is the reconciler's own count (reset by every transition);
the step's failures count in ``attempts``, its retry budget, which the re-enqueued message draws on.

Orphans (invariant 4): every credential keyrotor issues is named ``keyrotor-<run id>``. A
provider key with such a name is revoked when no version in the database records its provider key
id (judged by id, not by name: a late issue call may mint a second key under the run's name) —
unless its run is still issuing — and it is older than ``min_age_s`` (its creation time, or when
the scan first saw it when the list gives none), so a key whose issue step has not yet recorded
it is never touched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Callable, Iterable

from sqlalchemy import and_, select, update
from sqlalchemy.engine import Engine
from sqlmodel import col

from worker.pipeline.outbox import enqueue_after_commit
from worker.service.hooks import Pipeline, default_pipeline
from worker.clock import as_utc, utcnow
from worker.db.models import (
    AuditEvent,
    KeyVersion,
    ManagedKey,
    ProviderKeySighting,
    ProviderRecord,
    RotationRun,
    VersionStage,
)
from worker.errors import StateConflict
from worker.pipeline.runs import run_state, transition
from worker.protocol import FailureKind, failure_target, next_step
from worker.protocol.states import TERMINAL_STATES, WAITING_STATES, RunState
from worker.db.session import session_scope
from worker.log import get_logger
from worker.notify import notify_function
from worker.providers.base import Provider, RevokeOutcome, revoke_outcome
from worker.providers.ratelimit import shared_limiter
from worker.providers.registry import provider_builder
from worker.secret_refs import make_resolver
from worker.settings import get_settings
from worker.vault.store import VaultStore

log = get_logger(__name__)

ACTOR = "reconciler"
ORPHAN_NAME = re.compile(r"^keyrotor-(?P<run_id>[A-Za-z0-9_.:-]{4,64})$")
LIVE_STAGES = (VersionStage.pending.value, VersionStage.current.value, VersionStage.previous.value)

NotifyFn = Callable[..., None]


def _default_notify(engine: Any) -> NotifyFn:
    """Notifications to the sinks of the inventory applied to ``engine`` (not the process's
    default database); the scheduler passes one with its settings (Vault references)."""
    return notify_function(engine)


# --------------------------------------------------------------------------- stuck runs
@dataclass
class StuckResult:
    requeued: list[str] = field(default_factory=list)
    needs_attention: list[str] = field(default_factory=list)
    #: Out of re-enqueues and sent down the protocol's failure path (rolling back, compensating).
    failed_over: list[str] = field(default_factory=list)


def stuck_runs_query(now: datetime, batch: int):
    skip = [s.value for s in (*TERMINAL_STATES, *WAITING_STATES)]  # over, or a person acts next
    in_grace = and_(col(RotationRun.state) == RunState.verified.value, col(RotationRun.grace_until) > now)
    return (
        select(RotationRun)
        .where(col(RotationRun.step_deadline_at) < now, col(RotationRun.state).not_in(skip), ~in_grace)
        .order_by(col(RotationRun.step_deadline_at))
        .limit(batch)
    )


def recover_stuck_runs(
    engine: Engine,
    *,
    now: datetime | None = None,
    max_attempts: int = 5,
    step_timeout_s: float = 900.0,
    batch: int = 500,
    pipeline: Pipeline | None = None,
    notify: NotifyFn | None = None,
) -> StuckResult:
    now = now or utcnow()
    pipeline = pipeline or default_pipeline()
    notify = notify or _default_notify(engine)
    result = StuckResult()
    with session_scope(engine) as session:
        stuck = [(r.id, r.state, r.requeues) for r in session.scalars(stuck_runs_query(now, batch)).all()]
    for run_id, state, requeues in stuck:
        state_value = RunState(state).value
        # Conditional on what we read: if the worker moved the run meanwhile, we do nothing.
        still_stuck = and_(
            RotationRun.id == run_id,
            col(RotationRun.state) == state_value,
            RotationRun.requeues == requeues,
            col(RotationRun.step_deadline_at) < now,
        )
        with session_scope(engine) as session:
            if requeues + 1 > max_attempts:
                run = session.get(RotationRun, run_id)
                if run is None or run_state(run).value != state_value:
                    continue
                # Out of re-enqueues: the step failed for good ("exhausted"); the protocol says where
                # that leads in this run's mode (rolling_back after promotion in overlap/assisted,
                # needs_attention elsewhere), and transition() refuses anything it forbids.
                target = failure_target(run.mode, RunState(state_value), FailureKind.exhausted,
                                        emergency=bool(run.emergency))
                reason = (f"no progress in state {state_value} after {requeues} re-enqueues"
                          + ("; a person has to look" if target == RunState.needs_attention else f"; {target.value}"))
                waits = next_step(run.mode, target) is None
                # Waiting for a person keeps the step's own attempt count for whoever looks (as fail_run).
                kept: dict[str, Any] = {"attempts": run.attempts} if waits else {}
                try:
                    moved = transition(session, run, target, actor=ACTOR, last_error=reason, requeues=requeues, **kept,
                                       deadline_s=None if waits else step_timeout_s, still=(still_stuck,),
                                       detail={"reason": reason, "requeues": requeues})
                except StateConflict:  # a worker moved it meanwhile: nothing to do
                    session.rollback()
                    continue
                if not waits:
                    enqueue_after_commit(session, moved, pipeline.enqueue_run)
                key = session.get(ManagedKey, run.key_id)
                key_name = key.name if key else str(run.key_id)
            else:
                requeued = session.exec(
                    update(RotationRun).where(still_stuck)
                    .values(requeues=requeues + 1, step_deadline_at=now + timedelta(seconds=step_timeout_s), updated_at=now)
                ).rowcount
                if requeued != 1:
                    continue
                run = session.get(RotationRun, run_id)
                assert run is not None
                session.add(AuditEvent(at=now, run_id=run_id, key_id=run.key_id, actor=ACTOR, event="requeued",
                                       from_state=state_value, to_state=state_value, detail={"requeue": requeues + 1}))
                enqueue_after_commit(session, run, pipeline.enqueue_run)
                key_name = None
        if key_name is None:
            result.requeued.append(run_id)
            log.warning("stuck_run_requeued", run_id=run_id, state=state_value, requeue=requeues + 1)
        elif target != RunState.needs_attention:
            result.failed_over.append(run_id)
            log.error("stuck_run_failed", run_id=run_id, state=state_value, to_state=target.value, requeues=requeues,
                      key=key_name)
        else:
            result.needs_attention.append(run_id)
            log.error("stuck_run_needs_attention", run_id=run_id, state=state_value, requeues=requeues, key=key_name)
            try:
                notify("needs_attention", key_name=key_name, run_id=run_id,
                       detail={"state": state_value, "requeues": requeues, "reason": "stuck past its step deadline"})
            except Exception as exc:  # notify never raises by contract; belt and braces
                log.error("notify_failed", run_id=run_id, error=type(exc).__name__)
    return result


# --------------------------------------------------------------------------- orphans
@dataclass(frozen=True)
class RevokedOrphan:
    provider: str
    provider_key_id: str | None
    name: str
    run_id: str


ProviderFactory = Callable[[ProviderRecord], Provider]


def default_provider_factory() -> ProviderFactory:
    """Build providers the way workers do: secret references resolved via Vault, shared rate limit."""
    settings = get_settings()
    vault = VaultStore.from_settings(settings) if settings.vault_addr else None
    resolve = make_resolver(vault)
    return provider_builder(resolve, shared_limiter(settings.redis_url, namespace=settings.queue_namespace))


def _is_orphan(session: Any, provider: str, key_id: str, run_id: str) -> tuple[bool, str | None]:
    """(orphan?, credential type to revoke with), judged by provider key id: a key named after a
    run is an orphan unless a live version (pending = staged, current, previous in grace) records
    this very id — the name alone proves nothing (a late issue call mints a second key under it).
    Left alone: keys of a run still in ``requested`` (its issue step settles the keys named after
    it) and of a run a person must look at before anything was recorded (one may be in staging)."""
    run = session.get(RotationRun, run_id)
    if run is not None:
        state = RunState(run.state)
        if state == RunState.requested or (state == RunState.needs_attention and run.new_version_id is None):
            return False, None
    live = session.exec(
        select(col(KeyVersion.id))
        .join(ManagedKey, col(ManagedKey.id) == col(KeyVersion.key_id))
        .where(col(ManagedKey.provider) == provider, col(KeyVersion.provider_key_id) == key_id,
               col(KeyVersion.stage).in_(LIVE_STAGES))
        .limit(1)
    ).first()
    if live is not None:
        return False, None
    credential_type = None
    if run is not None:
        key = session.get(ManagedKey, run.key_id)
        credential_type = run.target_credential_type or (key.credential_type if key else None)
    return True, credential_type


def first_seen(engine: Engine, provider: str, key_ids: list[str], now: datetime) -> dict[str, datetime]:
    """When the scan first saw each of ``key_ids`` (recorded now for new ones); sightings of keys
    the provider no longer lists are forgotten. The minimum-age guard uses this when the list
    gives no creation time, so a key just minted is never taken for an orphan."""
    with session_scope(engine) as session:
        rows = {r.provider_key_id: r for r in session.scalars(
            select(ProviderKeySighting).where(col(ProviderKeySighting.provider) == provider)).all()}
        wanted = set(key_ids)
        for key_id, row in rows.items():
            if key_id not in wanted:
                session.delete(row)
        seen: dict[str, datetime] = {}
        for key_id in wanted:
            sighting = rows.get(key_id)
            if sighting is None:
                sighting = ProviderKeySighting(provider=provider, provider_key_id=key_id, first_seen_at=now)
                session.add(sighting)
            seen[key_id] = as_utc(sighting.first_seen_at) or now
    return seen


def revoke_orphans(
    engine: Engine,
    *,
    now: datetime | None = None,
    min_age_s: float = 600.0,
    provider_factory: ProviderFactory | None = None,
    providers: Iterable[str] | None = None,
) -> list[RevokedOrphan]:
    """List each provider's keys and revoke those named after a run that no live version holds.

    Each key is judged against the database right before it is revoked (the list may be minutes
    old by then: ``retire`` may have revoked it meanwhile). Only a revocation the provider confirms
    is an ``orphan_revoked`` event, stamped when it happened; a 404 (already gone) is not. Keys the
    list marks as revoked/inactive (``response.revoked``) are skipped.
    """
    now = now or utcnow()
    factory = provider_factory or default_provider_factory()
    with session_scope(engine) as session:
        query = select(ProviderRecord).order_by(ProviderRecord.name)
        if providers is not None:
            query = query.where(col(ProviderRecord.name).in_(list(providers)))
        records = list(session.scalars(query).all())
    revoked: list[RevokedOrphan] = []
    for record in records:
        try:
            provider = factory(record)
            if not (provider.can_list and provider.can_revoke):
                continue  # nothing to find or nothing we could do (plan/status say so)
            listed = provider.list_keys()
        except Exception as exc:  # one provider down must not stop the others
            log.warning("orphan_scan_failed", provider=record.name, error=type(exc).__name__, detail=str(exc)[:200])
            continue
        ours = []
        for info in listed:
            name = getattr(info, "name", None) or ""
            match = ORPHAN_NAME.match(name)
            if not match:
                continue  # not ours: keys made by people or other tools are never touched
            key_id = getattr(info, "key_id", None)
            if not key_id:
                log.warning("orphan_without_id", provider=record.name, name=info.name,
                            detail="the list gives no key id; it cannot be judged or revoked by id")
                continue
            ours.append((info, name, str(key_id), match["run_id"]))
        seen = first_seen(engine, record.name, [key_id for _, _, key_id, _ in ours], now)
        for info, name, key_id, run_id in ours:
            if getattr(info, "live", None) is False:
                continue  # the provider says it is revoked already
            born = as_utc(getattr(info, "created_at", None)) or seen[key_id]
            if now - born < timedelta(seconds=min_age_s):
                continue
            found = _revoke_orphan(engine, provider, record.name, name, key_id, run_id)
            if found is not None:
                revoked.append(found)
    return revoked


def _revoke_orphan(engine: Engine, provider: Any, provider_name: str, name: str, key_id: str,
                   run_id: str) -> RevokedOrphan | None:
    """Re-check the key against the database now, revoke it, and record what the provider said."""
    with session_scope(engine) as session:
        orphan, credential_type = _is_orphan(session, provider_name, key_id, run_id)
    if not orphan:
        return None
    try:
        outcome = revoke_outcome(provider.revoke(key_id=key_id, secret=None, credential_type=credential_type or ""))
    except Exception as exc:
        log.warning("orphan_revoke_failed", provider=provider_name, provider_key_id=key_id, name=name,
                    error=type(exc).__name__, detail=str(exc)[:200])
        return None
    if outcome is RevokeOutcome.already_gone:
        log.info("orphan_already_gone", provider=provider_name, provider_key_id=key_id, name=name)
        return None
    with session_scope(engine) as session:
        run = session.get(RotationRun, run_id)
        session.add(AuditEvent(at=utcnow(), run_id=run_id if run is not None else None,
                               key_id=run.key_id if run is not None else None, actor=ACTOR, event="orphan_revoked",
                               detail={"provider": provider_name, "provider_key_id": key_id, "name": name,
                                       "revocation": outcome.value, "run_known": run is not None}))
    log.warning("orphan_revoked", provider=provider_name, provider_key_id=key_id, name=name, run_id=run_id)
    return RevokedOrphan(provider_name, key_id, name, run_id)
