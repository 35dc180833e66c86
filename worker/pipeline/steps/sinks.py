"""Delivery to the key's integrations (sinks): ``propagate`` pushes the new key to all of them,
``verify`` confirms the provider and every sink accept it; the push helpers also serve rollback."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Optional

from sqlmodel import Session

from worker import log
from worker.clock import utcnow
from worker.db.models import KeyVersion, SinkDelivery
from worker.db.session import session_scope
from worker.errors import ConfigError, PermanentError, TransientError, is_permanent
from worker.pipeline.context import PipelineContext
from worker.pipeline.effects import announcement, holding, safe_error, verify_status
from worker.pipeline.steps.common import (Snapshot, StepOutcome, advance_run, integration_session, load_snapshot,
                                          require_staged)
from worker.pipeline.row_writes import ConditionalWrite, InsertRow, UpdateRows, execute_writes
from worker.pipeline.runs import extend_deadline
from worker.pipeline.steps.provider import check_credential, deprecated_error, provider_for
from worker.protocol import RunState, Step, has_grace_period
from worker.secret import Secret

logger = log.get_logger("keyrotor.pipeline")
S = RunState


def announcement_for(snap: Snapshot, event: str, secret: Secret, version: KeyVersion, vault_version: int) -> Any:
    return announcement(event=event, key_name=snap.key.name, run_id=snap.run.id,
                        provider_key_id=version.provider_key_id, fingerprint=secret.fingerprint,
                        vault_mount=snap.key.vault_mount, vault_path=snap.key.vault_path,
                        vault_field=snap.key.vault_field, vault_version=vault_version, secret=secret)


def push_all(ctx: PipelineContext, snap: Snapshot, ann: Any, *, done_status: str, skip: set[str]) -> list[tuple[str, BaseException]]:
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


def push_each(ctx: PipelineContext, snap: Snapshot, ann: Any, *, done_status: str) -> tuple[
        list[dict[str, Any]], list[tuple[str, BaseException]]]:
    """Push ``ann`` to every integration of the key, recording nothing yet: the sink rows to
    write (``push_writes``) and the failures. For a run no earlier attempt pushed for
    (``Snapshot.entered_in_chain``), whose rows then go into the step's own transition."""
    rows: list[dict[str, Any]] = []
    failures: list[tuple[str, BaseException]] = []
    with integration_session(ctx, snap) as session:
        for name in snap.key.integrations or []:
            status, error = done_status, None
            try:
                ctx.integration_factory(session, name).push(ann)
            except Exception as exc:
                status, error = "failed", safe_error(exc)
                failures.append((name, exc))
                logger.warning("sink.push_failed", integration=name, error=error)
            rows.append({"integration": name, "status": status, "last_error": error, "fingerprint": ann.fingerprint})
    return rows, failures


_SINKS = SinkDelivery.__table__  # type: ignore[attr-defined]


def push_writes(run_id: str, rows: list[dict[str, Any]]) -> list[ConditionalWrite]:
    """The rows of ``push_each``'s first pushes for a run (none existed): one INSERT each, made
    with the transition (``advance_run``'s ``writes``) or at once (``execute_writes``)."""
    now = utcnow()
    return [InsertRow(_SINKS, {"run_id": run_id, "attempts": 1, "updated_at": now, **row}) for row in rows]


def verification_writes(run_id: str, rows: list[dict[str, Any]]) -> list[ConditionalWrite]:
    """Each sink's answer to verify, by (run, integration): ``verified``, or the status kept with
    what it said in ``last_error``. A sink with no row yet (added to the key after propagate)
    gets one: an UPDATE and an INSERT unless the row exists, which see the same rows whether they
    run as one statement (the transition's) or one after the other (``execute_writes``)."""
    now = utcnow()
    writes: list[ConditionalWrite] = []
    for row in rows:
        values: dict[str, Any] = {"last_error": row["last_error"], "updated_at": now}
        if row["status"] == "verified":
            values["status"] = "verified"
        writes.append(UpdateRows(_SINKS, {"run_id": run_id, "integration": row["integration"]}, values))
        writes.append(InsertRow(_SINKS, {"run_id": run_id, "attempts": 0, "updated_at": now, **row},
                                unless=("run_id", "integration")))
    return writes


def _sink_row(session: Session, run_id: str, name: str) -> SinkDelivery:
    from sqlmodel import select

    row = session.exec(select(SinkDelivery).where(SinkDelivery.run_id == run_id, SinkDelivery.integration == name)).first()
    if row is None:
        row = SinkDelivery(run_id=run_id, integration=name, status="pending", attempts=0, updated_at=utcnow())
        session.add(row)
        session.flush()
    return row


def raise_sink_failures(failures: list[tuple[str, BaseException]], what: str) -> None:
    names = ", ".join(name for name, _ in failures)
    first = safe_error(failures[0][1])
    config = next((exc for _, exc in failures if isinstance(exc, ConfigError)), None)
    if config is not None:  # e.g. a signing secret reference that does not resolve: never retried
        raise ConfigError(f"{what} failed at {names}: {safe_error(config)}")
    if any(is_permanent(exc) for _, exc in failures):
        raise PermanentError(f"{what} failed permanently at {names}: {first}")
    waits = [getattr(exc, "retry_after", None) for _, exc in failures]
    retry_after = max((w for w in waits if w is not None), default=None)
    raise TransientError(f"{what} failed at {names} (will retry those only): {first}", retry_after=retry_after)


def propagate(ctx: PipelineContext, run_id: str) -> Optional[StepOutcome]:
    """promoted → propagated: push to every integration; all must succeed (no split brain)."""
    snap = load_snapshot(ctx, run_id, Step.propagate)
    if snap is None:
        return None
    if snap.new is None:
        raise PermanentError(f"run {snap.run.id} has no new version recorded; cannot propagate it")
    secret, _ = require_staged(ctx, snap, "propagate")
    detail = {"sinks": list(snap.key.integrations or [])}
    with holding(secret):
        ann = announcement_for(snap, "rotated", secret, snap.new, snap.new.vault_version or 0)
        if snap.entered_in_chain:
            # promote moved the run here a moment ago: no sink was pushed for it yet, so nothing is
            # read first, and the sinks' rows are written with the transition (one transaction).
            rows, failures = push_each(ctx, snap, ann, done_status="pushed")
            if not failures:
                return advance_run(ctx, snap, S.propagated, detail=detail, writes=push_writes(snap.run.id, rows))
            with session_scope(ctx.engine) as session:
                execute_writes(session, push_writes(snap.run.id, rows))
        else:  # an earlier attempt may have pushed some: skip those, record each as it goes
            failures = push_all(ctx, snap, ann, done_status="pushed", skip={"pushed", "verified"})
    if failures:
        raise_sink_failures(failures, "pushing the new key")
    return advance_run(ctx, snap, S.propagated, detail=detail)


def verify(ctx: PipelineContext, run_id: str) -> Optional[StepOutcome]:
    """propagated → verified: the provider and every integration accept the new key; grace starts."""
    snap = load_snapshot(ctx, run_id, Step.verify)
    if snap is None:
        return None
    if snap.new is None:
        raise PermanentError(f"run {snap.run.id} has no new version recorded; cannot verify it")
    secret, _ = require_staged(ctx, snap, "verify")
    provider = provider_for(ctx, snap)
    results: dict[str, str] = {}
    with holding(secret):
        ann = announcement_for(snap, "rotated", secret, snap.new, snap.new.vault_version or 0)
        mismatched: list[str] = []
        pending: list[tuple[str, float]] = []
        # Each sink's answer is recorded after all were asked: with the transition when all
        # passed, in a transaction of its own otherwise (a row says what its sink answered last).
        rows: list[dict[str, Any]] = []
        with integration_session(ctx, snap) as session:
            for name in snap.key.integrations or []:
                result = ctx.integration_factory(session, name).verify(ann)
                status, reported = verify_status(result)
                row: dict[str, Any] = {"integration": name, "status": "verified", "last_error": None,
                                       "fingerprint": ann.fingerprint}
                if status == "mismatch":
                    mismatched.append(f"{name} reports {reported or 'another key'}")
                    row.update(status="pending", last_error=f"verify: reports {reported}")
                elif status == "pending":  # holds the key, still taking it up (a rollout): poll
                    pending.append((name, getattr(result, "retry_in_s", None) or ctx.policy.activation_poll_s))
                    row.update(status="pending",
                               last_error=f"verify: pending: {getattr(result, 'detail', None) or 'not ready'}")
                rows.append(row)
                results[name] = status
        if not mismatched and not pending:  # the provider is asked once, not at every poll of a rollout
            # Always asked, even right after precheck: the first check after promotion, whose
            # failure still rolls Vault and the integrations back (invariant 1).
            outcome = check_credential(provider, secret, snap.credential_type)
            if outcome == "deprecated":
                raise deprecated_error(ctx, snap, "verify")
            if outcome != "valid":
                raise PermanentError(f"the provider now answers {outcome!r} for the new credential it accepted at precheck")
    if mismatched:
        with session_scope(ctx.engine) as session:
            execute_writes(session, verification_writes(snap.run.id, rows))
        raise TransientError("integrations do not serve the new key yet: " + "; ".join(mismatched))
    if pending:
        # Not a failure: no retry is used up; the integration bounds the wait (rollout timeout).
        again_s = min(wait for _, wait in pending)
        with session_scope(ctx.engine) as session:
            execute_writes(session, verification_writes(snap.run.id, rows))
            extend_deadline(session, snap.run, delay_s=again_s, time_limit_s=ctx.policy.time_limit_ms / 1000)
        logger.info("verify.pending", sinks=[name for name, _ in pending], again_in_s=again_s)
        return StepOutcome(state=S.propagated, mode=snap.mode, again_in_s=again_s)
    grace_s = float(snap.key.grace_period_s) if has_grace_period(snap.mode, emergency=snap.run.emergency) else 0.0
    grace_until = utcnow() + timedelta(seconds=grace_s)
    return advance_run(ctx, snap, S.verified, delay_s=grace_s, grace_until=grace_until,
                       writes=verification_writes(snap.run.id, rows),
                       detail={"grace_until": grace_until.isoformat(), "grace_s": grace_s, "sinks": results})
