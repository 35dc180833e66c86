"""The scheduler process: APScheduler 3 running the jobs, behind the Redis leader lock.

Every instance runs the same APScheduler jobs; only the one holding the lock *acts*. The lock
job acquires/renews every quarter of the TTL (at most every second, so a standby notices a
freed lock quickly); each other job checks ``lock.fence()`` (local validity + a Redis round
trip) right before it touches anything. Jobs only enqueue, and every request carries an
idempotency key, so even a leader that lost its lock mid-pass cannot cause a second run.

Jobs: detection, stuck-run recovery, retirement, orphan scan, reminders, deposits, liveness — each at its own
interval (settings ``KEYROTOR_SCHEDULER_*_INTERVAL_S`` or CLI options), ``coalesce=True`` and
``max_instances=1`` (a slow pass is never run twice at once, missed runs collapse into one),
with a misfire grace so a briefly busy process still runs the pass late instead of skipping it.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlmodel import col

from worker.service.detection import detect_due
from jobs.leader import LeaderLock, leader_lock_key
from worker.service.hooks import Pipeline, default_pipeline
from worker.service.reconcile import ProviderFactory, default_provider_factory, recover_stuck_runs, revoke_orphans
from worker.service.reminders import send_reminders
from worker.service.retirement import retire_due
from worker.clock import utcnow
from worker.db.models import ManagedKey, RotationRun
from worker.db.session import session_scope
from worker.log import get_logger
from worker.metrics import scheduler_metrics
from worker.ops_metrics import job_succeeded
from worker.pipeline.context import context_from_settings
from worker.service.deposits import collect_deposits
from worker.service.liveness import RedisCursor, check_liveness

log = get_logger(__name__)

JOB_NAMES = ("detection", "reconcile", "retirement", "orphans", "reminders", "deposits", "liveness")


@dataclass(frozen=True)
class SchedulerConfig:
    detection_s: float = 60.0
    reconcile_s: float = 120.0
    retirement_s: float = 60.0
    orphans_s: float = 900.0
    reminders_s: float = 3600.0
    deposits_s: float = 60.0
    liveness_s: float = 300.0
    liveness_per_pass: int = 10
    retry_base_s: float = 900.0
    retry_max_s: float = 6 * 3600.0
    lock_ttl_s: float = 30.0
    lock_name: str = leader_lock_key("keyrotor")
    namespace: str = "keyrotor"
    batch: int = 500
    max_attempts: int = 5
    step_timeout_s: float = 900.0
    orphan_min_age_s: float = 600.0
    reminder_lead_s: float = 14 * 86400.0
    reminder_repeat_s: float = 86400.0

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> "SchedulerConfig":
        values = dict(
            detection_s=settings.scheduler_detection_interval_s,
            reconcile_s=settings.scheduler_reconcile_interval_s,
            retirement_s=settings.scheduler_retirement_interval_s,
            orphans_s=settings.scheduler_orphan_interval_s,
            reminders_s=settings.scheduler_reminder_interval_s,
            deposits_s=settings.scheduler_deposit_interval_s,
            liveness_s=settings.scheduler_liveness_interval_s,
            liveness_per_pass=settings.scheduler_liveness_per_pass,
            retry_base_s=settings.scheduler_retry_base_s,
            retry_max_s=settings.scheduler_retry_max_s,
            lock_ttl_s=settings.scheduler_lock_ttl_s,
            lock_name=leader_lock_key(settings.queue_namespace),
            namespace=settings.queue_namespace,
            batch=settings.scheduler_batch_size,
            max_attempts=settings.reconcile_max_attempts,
            step_timeout_s=settings.reconcile_step_timeout_s,
            orphan_min_age_s=settings.orphan_min_age_s,
            reminder_lead_s=settings.reminder_lead_time_s,
            reminder_repeat_s=settings.reminder_repeat_s,
        )
        known = {f.name for f in fields(cls)}
        values.update({k: v for k, v in overrides.items() if k in known and v is not None})
        return cls(**values)

    @property
    def lock_tick_s(self) -> float:
        return max(0.05, min(self.lock_ttl_s / 4, 1.0))


class KeyrotorScheduler:
    """APScheduler + leader lock. ``start()`` returns at once; ``shutdown()`` releases the lock."""

    def __init__(
        self,
        engine: Engine,
        redis_client: Any,
        config: SchedulerConfig,
        *,
        pipeline: Pipeline | None = None,
        provider_factory: ProviderFactory | None = None,
        notify: Callable[..., None] | None = None,
        token: str | None = None,
        deposit_context: Callable[[], Any] | None = None,
    ) -> None:
        self.engine = engine
        self.config = config
        self.lock = LeaderLock(redis_client, config.lock_name, config.lock_ttl_s, token=token)
        self._pipeline = pipeline
        self._provider_factory = provider_factory
        self._notify = notify
        self._deposit_context = deposit_context   # () -> PipelineContext, built on the first deposits pass
        self._deposit_ctx: Any = None
        self._redis = redis_client
        self.passes: Counter[str] = Counter()   # completed passes per job (status, tests)
        self.errors: Counter[str] = Counter()
        self.became_leader_at: float | None = None
        self._stopped = threading.Event()
        self._aps = BackgroundScheduler(
            timezone=timezone.utc,
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30},
        )
        start = datetime.now(timezone.utc)
        self._aps.add_job(self._lock_tick, "interval", seconds=config.lock_tick_s, id="leader-lock", next_run_time=start,
                          misfire_grace_time=max(1, int(config.lock_tick_s)))
        intervals = {"detection": config.detection_s, "reconcile": config.reconcile_s, "retirement": config.retirement_s,
                     "orphans": config.orphans_s, "reminders": config.reminders_s, "deposits": config.deposits_s,
                     "liveness": config.liveness_s}
        for name in JOB_NAMES:
            self._aps.add_job(self._guarded, "interval", args=[name], seconds=intervals[name], id=name,
                              misfire_grace_time=max(1, int(intervals[name] / 2)))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._aps.start()
        log.info("scheduler_started", holder=self.lock.token, lock_ttl_s=self.config.lock_ttl_s,
                 intervals={n: getattr(self.config, f"{n}_s") for n in JOB_NAMES})

    def shutdown(self, *, release: bool = True) -> None:
        """Stop the jobs (waiting for a running pass) and hand the lock over at once."""
        self._stopped.set()
        if self._aps.running:
            self._aps.shutdown(wait=True)
        if release:
            self.lock.release()
        self._set_leader_metric(False)
        log.info("scheduler_stopped", holder=self.lock.token)

    def wait(self) -> None:
        self._stopped.wait()

    # ------------------------------------------------------------------ jobs
    def _lock_tick(self) -> None:
        if self._stopped.is_set():
            return
        was = self.lock.is_leader
        leads = self.lock.tick()
        self._set_leader_metric(leads)
        if leads and not was:
            self.became_leader_at = time.monotonic()
            # A new leader runs every pass now rather than up to one interval later.
            now = datetime.now(timezone.utc)
            for name in JOB_NAMES:
                self._aps.modify_job(name, next_run_time=now)
        elif was and not leads:
            log.warning("scheduler_standby", holder=self.lock.token)

    def _guarded(self, name: str) -> None:
        if self._stopped.is_set() or not self.lock.fence():
            return
        started = time.monotonic()
        try:
            outcome = self.run_job(name)
        except Exception as exc:  # logged; the next interval tries again
            self.errors[name] += 1
            log.error("scheduler_job_failed", job=name, error=type(exc).__name__, detail=str(exc)[:300])
            return
        self.passes[name] += 1

        job_succeeded(name)
        log.info("scheduler_job_done", job=name, seconds=round(time.monotonic() - started, 3), outcome=outcome)

    def run_job(self, name: str) -> Any:
        """Run one pass of ``name`` now (no leadership check: callers do that)."""
        cfg = self.config
        now = utcnow()
        if name == "detection":
            result = detect_due(self.engine, now=now, batch=cfg.batch, pipeline=self._get_pipeline(),
                                retry_base=timedelta(seconds=cfg.retry_base_s), retry_max=timedelta(seconds=cfg.retry_max_s))
            self._update_gauges(now)
            return {"requested": len(result.requested), "joined": len(result.joined), "errors": len(result.errors)}
        if name == "reconcile":
            stuck = recover_stuck_runs(self.engine, now=now, max_attempts=cfg.max_attempts, step_timeout_s=cfg.step_timeout_s,
                                       batch=cfg.batch, pipeline=self._get_pipeline(), notify=self._notify)
            return {"requeued": len(stuck.requeued), "needs_attention": len(stuck.needs_attention),
                    "failed_over": len(stuck.failed_over)}
        if name == "retirement":
            return {"enqueued": len(retire_due(self.engine, now=now, step_timeout_s=cfg.step_timeout_s, batch=cfg.batch,
                                               pipeline=self._get_pipeline()))}
        if name == "orphans":
            if self._provider_factory is None:
                self._provider_factory = default_provider_factory()
            return {"revoked": len(revoke_orphans(self.engine, now=now, min_age_s=cfg.orphan_min_age_s,
                                                  provider_factory=self._provider_factory))}
        if name == "reminders":
            return {"reminded": len(send_reminders(self.engine, now=now, lead_s=cfg.reminder_lead_s,
                                                   repeat_s=cfg.reminder_repeat_s, notify=self._notify, batch=cfg.batch))}
        if name == "deposits":
            done = collect_deposits(self._pipeline_context(), now=now, batch=cfg.batch)
            return {"accepted": len(done.accepted), "rejected": len(done.rejected), "reminded": len(done.reminded),
                    "expired": len(done.expired)}
        if name == "liveness":
            checked = check_liveness(self._pipeline_context(), cursor=RedisCursor(self._redis, cfg.namespace),
                                     per_pass=cfg.liveness_per_pass, now=now, pipeline=self._get_pipeline())
            return {"checked": len(checked.checked), "rotations": len(checked.rotations),
                    "deferred": len(checked.deferred), "errors": len(checked.errors)}
        raise ValueError(f"unknown job {name!r} (known: {', '.join(JOB_NAMES)})")

    # ------------------------------------------------------------------ helpers
    def _pipeline_context(self) -> Any:
        """The PipelineContext of the deposits and liveness jobs (built on first use)."""
        if self._deposit_ctx is None:
            self._deposit_ctx = self._deposit_context() if self._deposit_context else context_from_settings()
        return self._deposit_ctx

    def _get_pipeline(self) -> Pipeline:
        if self._pipeline is None:
            self._pipeline = default_pipeline()
        return self._pipeline

    def _set_leader_metric(self, leads: bool) -> None:
        scheduler_metrics().set_leader(leads)  # a standby drops the leader-only gauges

    def _update_gauges(self, now: datetime) -> None:
        """keys_due{provider} (an index range, O(keys due)) and open_runs{state}."""
        with session_scope(self.engine) as session:
            due = session.execute(
                select(col(ManagedKey.provider), func.count())
                .where(col(ManagedKey.enabled).is_(True), col(ManagedKey.next_due_at) <= now)
                .group_by(col(ManagedKey.provider))
            ).all()
            open_runs = session.execute(
                select(col(RotationRun.state), func.count()).where(col(RotationRun.finished_at).is_(None)).group_by(col(RotationRun.state))
            ).all()
        if self.lock.is_leader:  # lost the lock during the query: a standby exports no backlog
            scheduler_metrics().set_backlog(due, open_runs)
