"""The reconciler: recovers runs that stopped moving, and revokes credentials nobody owns.

Stuck runs: the database is the record of where each run is. A run that is not over, not
waiting for a person (``awaiting_deposit``, ``needs_attention``) and not legitimately waiting
for its grace period, whose ``step_deadline_at`` has passed, lost its message or its worker:
it is re-enqueued (attempts + 1, new deadline) — re-running a step is harmless (invariant 7).
After ``max_attempts`` it goes to ``needs_attention`` with an alert; the old key is untouched.

Orphans (invariant 4): every credential keyrotor issues is named ``keyrotor-<run id>``. A
provider key with such a name is revoked when no live version in the database (pending, current,
previous) holds it and its run is over or unknown — and it is older than ``min_age_s``, so a key
whose issue step has not yet recorded it is never touched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Callable, Iterable

from sqlalchemy import and_, or_, select, update
from sqlalchemy.engine import Engine

from jobs.pipeline_hooks import Pipeline, default_pipeline, enqueue_after_commit
from worker.clock import as_utc, utcnow
from worker.db.models import (
    TERMINAL_STATES,
    AuditEvent,
    KeyVersion,
    ManagedKey,
    ProviderRecord,
    RotationRun,
    RunState,
    VersionStage,
)
from worker.db.session import session_scope
from worker.log import get_logger

log = get_logger(__name__)

ACTOR = "reconciler"
ORPHAN_NAME = re.compile(r"^keyrotor-(?P<run_id>[A-Za-z0-9_.:-]{4,64})$")
#: Open states the reconciler leaves alone: a person acts next.
WAITING_FOR_PERSON = frozenset({RunState.awaiting_deposit, RunState.needs_attention})
LIVE_STAGES = (VersionStage.pending.value, VersionStage.current.value, VersionStage.previous.value)

NotifyFn = Callable[..., None]


def _default_notify(engine: Any) -> NotifyFn:
    """Notifications to the sinks of the inventory applied to ``engine`` (not the process's
    default database); the scheduler passes one with its settings (Vault references)."""
    from worker.notify import notify_function

    return notify_function(engine)


# --------------------------------------------------------------------------- stuck runs
@dataclass
class StuckResult:
    requeued: list[str] = field(default_factory=list)
    needs_attention: list[str] = field(default_factory=list)


def stuck_runs_query(now: datetime, batch: int):  # type: ignore[no-untyped-def]
    skip = [s.value for s in (*TERMINAL_STATES, *WAITING_FOR_PERSON)]
    in_grace = and_(RotationRun.state == RunState.verified.value, RotationRun.grace_until > now)  # type: ignore[arg-type,operator]
    return (
        select(RotationRun)
        .where(RotationRun.step_deadline_at < now, RotationRun.state.not_in(skip), ~in_grace)  # type: ignore[union-attr,attr-defined,operator]
        .order_by(RotationRun.step_deadline_at)  # type: ignore[arg-type]
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
        stuck = [(r.id, r.state, r.attempts) for r in session.scalars(stuck_runs_query(now, batch)).all()]  # type: ignore[call-overload]
    for run_id, state, attempts in stuck:
        state_value = RunState(state).value
        # Conditional on what we read: if the worker moved the run meanwhile, we do nothing.
        still_stuck = and_(
            RotationRun.id == run_id,
            RotationRun.state == state_value,
            RotationRun.attempts == attempts,
            RotationRun.step_deadline_at < now,  # type: ignore[operator]
        )
        with session_scope(engine) as session:
            if attempts + 1 > max_attempts:
                reason = f"no progress in state {state_value} after {attempts} re-enqueues; a person has to look"
                moved = session.exec(  # type: ignore[call-overload]
                    update(RotationRun).where(still_stuck)
                    .values(state=RunState.needs_attention.value, last_error=reason, updated_at=now)
                ).rowcount
                if moved != 1:
                    continue
                run = session.get(RotationRun, run_id)
                assert run is not None
                session.add(AuditEvent(at=now, run_id=run_id, key_id=run.key_id, actor=ACTOR, event="state_changed",
                                       from_state=state_value, to_state=RunState.needs_attention.value,
                                       detail={"reason": reason, "attempts": attempts}))
                key = session.get(ManagedKey, run.key_id)
                key_name = key.name if key else str(run.key_id)
            else:
                moved = session.exec(  # type: ignore[call-overload]
                    update(RotationRun).where(still_stuck)
                    .values(attempts=attempts + 1, step_deadline_at=now + timedelta(seconds=step_timeout_s), updated_at=now)
                ).rowcount
                if moved != 1:
                    continue
                run = session.get(RotationRun, run_id)
                assert run is not None
                session.add(AuditEvent(at=now, run_id=run_id, key_id=run.key_id, actor=ACTOR, event="requeued",
                                       from_state=state_value, to_state=state_value, detail={"attempt": attempts + 1}))
                enqueue_after_commit(session, run, pipeline.enqueue_run)
                key_name = None
        if key_name is None:
            result.requeued.append(run_id)
            log.warning("stuck_run_requeued", run_id=run_id, state=state_value, attempt=attempts + 1)
        else:
            result.needs_attention.append(run_id)
            log.error("stuck_run_needs_attention", run_id=run_id, state=state_value, attempts=attempts, key=key_name)
            try:
                notify("needs_attention", key_name=key_name, run_id=run_id,
                       detail={"state": state_value, "attempts": attempts, "reason": "stuck past its step deadline"})
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


ProviderFactory = Callable[[ProviderRecord], Any]  # → worker.providers.base.Provider


def default_provider_factory() -> ProviderFactory:
    """Build providers the way workers do: secret references resolved via Vault, shared rate limit."""
    from worker.providers.registry import build_provider
    from worker.secret_refs import make_resolver
    from worker.settings import get_settings
    from worker.vault.store import VaultStore

    settings = get_settings()
    vault = VaultStore.from_settings(settings) if settings.vault_addr else None
    resolve = make_resolver(vault)
    limiter = _shared_limiter(settings)

    def build(record: ProviderRecord) -> Any:
        return build_provider(record, resolve=resolve, limiter=limiter)

    return build


def _shared_limiter(settings: Any) -> Any:
    from worker.providers.ratelimit import RedisRateLimiter

    return RedisRateLimiter.from_url(settings.redis_url, namespace=settings.queue_namespace)


def _is_orphan(session: Any, provider: str, key_id: str | None, name: str, run_id: str) -> tuple[bool, str | None]:
    """(orphan?, credential type to revoke with)."""
    run = session.get(RotationRun, run_id)
    if run is not None and RunState(run.state) not in TERMINAL_STATES:
        return False, None  # an open run owns its credential (compensation/rollback revoke it)
    holders = [KeyVersion.provider_key_name == name]
    if key_id:
        holders.append(KeyVersion.provider_key_id == key_id)
    live = session.exec(  # type: ignore[call-overload]
        select(KeyVersion.id)
        .join(ManagedKey, ManagedKey.id == KeyVersion.key_id)  # type: ignore[arg-type]
        .where(ManagedKey.provider == provider, KeyVersion.stage.in_(LIVE_STAGES), or_(*holders))  # type: ignore[union-attr,attr-defined,arg-type]
        .limit(1)
    ).first()
    if live is not None:
        return False, None
    credential_type = None
    if run is not None:
        key = session.get(ManagedKey, run.key_id)
        credential_type = run.target_credential_type or (key.credential_type if key else None)
    return True, credential_type


def revoke_orphans(
    engine: Engine,
    *,
    now: datetime | None = None,
    min_age_s: float = 600.0,
    provider_factory: ProviderFactory | None = None,
    providers: Iterable[str] | None = None,
) -> list[RevokedOrphan]:
    """List each provider's keys and revoke those named after a run that owns no live version."""
    now = now or utcnow()
    factory = provider_factory or default_provider_factory()
    with session_scope(engine) as session:
        query = select(ProviderRecord).order_by(ProviderRecord.name)  # type: ignore[arg-type]
        if providers is not None:
            query = query.where(ProviderRecord.name.in_(list(providers)))  # type: ignore[attr-defined]
        records = list(session.scalars(query).all())  # type: ignore[call-overload]
    revoked: list[RevokedOrphan] = []
    for record in records:
        try:
            provider = factory(record)
            if not (getattr(provider, "can_list", False) and getattr(provider, "can_revoke", False)):
                continue  # nothing to find or nothing we could do: skip quietly
            listed = provider.list_keys()
        except Exception as exc:  # one provider down must not stop the others
            log.warning("orphan_scan_failed", provider=record.name, error=type(exc).__name__, detail=str(exc)[:200])
            continue
        for info in listed:
            name = getattr(info, "name", None) or ""
            match = ORPHAN_NAME.match(name)
            if not match:
                continue  # not ours: keys made by people or other tools are never touched
            created_at = as_utc(getattr(info, "created_at", None))
            if created_at is not None and now - created_at < timedelta(seconds=min_age_s):
                continue
            key_id = getattr(info, "key_id", None)
            run_id = match["run_id"]
            with session_scope(engine) as session:
                orphan, credential_type = _is_orphan(session, record.name, key_id, name, run_id)
            if not orphan:
                continue
            try:
                provider.revoke(key_id=key_id, secret=None, credential_type=credential_type or "")
            except Exception as exc:
                log.warning("orphan_revoke_failed", provider=record.name, provider_key_id=key_id, name=name,
                            error=type(exc).__name__, detail=str(exc)[:200])
                continue
            with session_scope(engine) as session:
                run = session.get(RotationRun, run_id)
                session.add(AuditEvent(at=now, run_id=run_id if run is not None else None,
                                       key_id=run.key_id if run is not None else None, actor=ACTOR,
                                       event="orphan_revoked",
                                       detail={"provider": record.name, "provider_key_id": key_id, "name": name,
                                               "run_known": run is not None}))
            revoked.append(RevokedOrphan(record.name, key_id, name, run_id))
            log.warning("orphan_revoked", provider=record.name, provider_key_id=key_id, name=name, run_id=run_id)
    return revoked
