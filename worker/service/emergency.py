"""Emergency rotation: every enabled key of a provider at once, no grace period (after a breach,
as with Workfront's "remove all API keys").

Runs are requested in the caller's transaction; the caller enqueues them (``enqueue_run``) after
it commits, as with ``request_rotation`` (the CLI and the queue consumer do). Workers drive them
in parallel, and every provider call passes through the provider's shared (Redis-backed) rate
limiter, so the burst stays within the provider's limit whatever the number of workers.
A key that already has an open run joins it (one open run per key, invariant 3); the pipeline
marks such joined runs as emergency. A run that waits for a person (``needs_attention``,
``awaiting_deposit``) is taken over instead (``worker.pipeline.takeover``): cancelled and replaced
by a fresh emergency run, or resumed as an emergency. A key whose run could not be taken over is
reported (``not_rotated``), logged as an error and alerted (``needs_attention``) — never skipped.
"""

from __future__ import annotations

import uuid

from sqlmodel import col, select, Session

from worker.service.hooks import Pipeline, default_pipeline
from worker.db.models import ManagedKey, ProviderRecord, RotationRun
from worker.errors import ConfigError
from worker.log import get_logger
from worker import notify  # the module, not the name: the alert's sink is looked up when it fires
from worker.pipeline.takeover import TAKEOVER_STATES
from worker.protocol.states import RunState

log = get_logger(__name__)


def request_provider_rotation(
    session: Session,
    *,
    provider: str,
    requested_by: str,
    reason: str = "breach",
    batch_id: str | None = None,
    pipeline: Pipeline | None = None,
) -> list[tuple[RotationRun, bool]]:
    """One emergency run per enabled key of ``provider``, as ``(run, created)`` pairs.

    ``created`` is False where the key's open run (or this batch's earlier run) was joined; the
    caller enqueues the created runs after commit (joined ones are already on their way).

    ``batch_id`` makes a repeated request idempotent (the queue message's idempotency key);
    without it each call is a new emergency.
    """
    if session.get(ProviderRecord, provider) is None:
        raise ConfigError(f"unknown provider {provider!r}: run `keyrotor config apply` or check the name with `keyrotor status`")
    pipeline = pipeline or default_pipeline()  # only its request_rotation is used here
    batch_id = batch_id or uuid.uuid4().hex[:12]
    keys = session.exec(
        select(ManagedKey).where(col(ManagedKey.provider) == provider, col(ManagedKey.enabled).is_(True)).order_by(col(ManagedKey.name))
    ).all()
    runs: list[tuple[RotationRun, bool]] = []
    for key in keys:
        run, created = pipeline.request_rotation(
            session,
            key_name=key.name,
            reason=reason,
            trigger="emergency",
            requested_by=requested_by,
            idempotency_key=f"emergency:{batch_id}:{key.id}",
            emergency=True,
        )
        runs.append((run, created))
    log.warning("emergency_rotation_requested", provider=provider, keys=len(keys), batch_id=batch_id,
                requested_by=requested_by, reason=reason)
    names = {key.id: key.name for key in keys}
    for run in not_rotated([r for r, _ in runs]):
        log.error("emergency.not_taken_over", key=names.get(run.key_id), run_id=run.id, state=str(run.state),
                  detail=f"the run waits for a person and could not be taken over safely; `keyrotor resolve {run.id}`")
        _alert(session, names.get(run.key_id) or "?", run)
    return runs


def not_rotated(runs: list[RotationRun]) -> list[RotationRun]:
    """Runs an emergency left waiting for a person (not taken over): their keys are not rotated."""
    return [run for run in runs if RunState(run.state) in TAKEOVER_STATES]


def _alert(session: Session, key_name: str, run: RotationRun) -> None:
    """A needs_attention alert through the applied inventory's sinks (never raises)."""
    try:
        notify.notify_function(session.get_bind())("needs_attention", key_name=key_name, run_id=run.id, detail={
            "emergency": True, "state": str(run.state),
            "action": "an emergency could not take over this run; the exposed credential is still in use: "
                      f"`keyrotor resolve {run.id}`"})
    except Exception as exc:  # noqa: BLE001 - an alert must never break the request
        log.error("notify.failed", alert="needs_attention", error=type(exc).__name__)
