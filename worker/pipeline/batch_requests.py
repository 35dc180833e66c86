"""Requesting rotations for many keys in one transaction (the scheduler's detection pass).

``request_rotation`` costs about ten statements and, called once per key in a transaction of
its own, a commit per key: 100 due keys took seconds. ``request_rotations`` does the same for a
batch with a fixed number of statements, whatever its size: the keys, their providers and their
existing runs (same idempotency key, or open) are read with one query each, the new runs are
inserted with one ``INSERT … ON CONFLICT DO NOTHING RETURNING`` and the audit events with one
insert. Invariant 3 stays the database's: a run another producer inserted meanwhile makes the
insert skip that row, and the request joins the winner, as ``request_rotation`` does.

Only what the scheduler asks is supported (no emergency, no ``not_before``). A problem with one
request (unknown or disabled key, a target type the provider does not issue, an idempotency key
used for another key) is returned for that request and the others go ahead; a database error
fails the whole batch, and the caller falls back to one ``request_rotation`` per key.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Mapping, Optional, Sequence, Union

from sqlalchemy import and_, insert, or_
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col, select

from worker.clock import utcnow
from worker.db.models import AuditEvent, ManagedKey, ProviderRecord, RotationRun, saved_id
from worker.errors import PermanentError
from worker.pipeline.requests import UnknownKey, first_step_deadline, new_run_id
from worker.pipeline.targets import rotation_target
from worker.protocol import parse_mode
from worker.protocol.states import RunState


_INSERTS: dict[str, Any] = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}


@dataclass(frozen=True)
class RotationRequest:
    key_name: str
    reason: str
    idempotency_key: str
    target_credential_type: Optional[str] = None


#: Per request: ``(run, created)`` as ``request_rotation`` returns it, or the error that refused it.
Outcome = Union["tuple[RotationRun, bool]", Exception]


def supports_batch(session: Session) -> bool:
    """Whether the database's dialect has the ``ON CONFLICT DO NOTHING`` the batch relies on."""
    return session.get_bind().dialect.name in _INSERTS


def request_rotations(session: Session, requests: Sequence[RotationRequest], *, trigger: str, requested_by: str,
                      keys: Optional[Mapping[str, ManagedKey]] = None) -> dict[str, Outcome]:
    """One outcome per request, by key name. The caller commits (and enqueues created runs after).
    ``keys``: the requests' keys by name, when the caller read them in this transaction."""
    dialect = session.get_bind().dialect.name
    if dialect not in _INSERTS:
        raise NotImplementedError(f"no batched requests on {dialect}")
    names = [r.key_name for r in requests]
    if keys is None or any(name not in keys for name in names):
        keys = {k.name: k for k in session.exec(select(ManagedKey).where(col(ManagedKey.name).in_(names))).all()}
    providers = {p.name: p for p in session.exec(
        select(ProviderRecord).where(col(ProviderRecord.name).in_({k.provider for k in keys.values()}))).all()}
    idempotency_keys = [r.idempotency_key for r in requests]
    existing = _existing_runs(session, idempotency_keys, [saved_id(k) for k in keys.values()])

    now = utcnow()
    outcomes: dict[str, Outcome] = {}
    joins: list[tuple[RotationRequest, RotationRun]] = []
    new: list[tuple[RotationRequest, dict[str, Any]]] = []
    for request in requests:
        try:
            key = _usable_key(keys.get(request.key_name), request.key_name)
            provider = providers.get(key.provider)
            target = rotation_target(provider=key.provider, provider_spec=provider.spec if provider else None,
                                     current_type=key.credential_type, requested=request.target_credential_type, now=now)
            found = _found(existing, key, request.idempotency_key)
        except Exception as exc:  # this request only; the rest of the batch goes ahead
            outcomes[request.key_name] = exc
            continue
        if found is not None:
            joins.append((request, found))
            continue
        new.append((request, {
            "id": new_run_id(), "key_id": saved_id(key), "state": RunState.requested.value,
            "mode": parse_mode(provider.mode if provider else None).value, "trigger": trigger, "reason": request.reason,
            "requested_by": requested_by, "idempotency_key": request.idempotency_key, "emergency": False,
            "target_credential_type": target, "attempts": 0, "requeues": 0, "created_at": now, "updated_at": now,
            "step_deadline_at": first_step_deadline(now)}))

    inserted = _insert_runs(session, dialect, [row for _, row in new])
    lost = [(request, row) for request, row in new if row["id"] not in inserted]
    if lost:  # another producer's run won the key or the idempotency key meanwhile: join it
        winners = _existing_runs(session, [r.idempotency_key for r, _ in lost], [row["key_id"] for _, row in lost])
        for request, row in lost:
            winner = winners.get(("idem", request.idempotency_key)) or winners.get(("open", row["key_id"]))
            if winner is None:
                outcomes[request.key_name] = RuntimeError("the run's insert was skipped but no conflicting run is visible")
            else:
                joins.append((request, winner))

    events: list[dict[str, Any]] = []
    for request, row in new:
        run = inserted.get(row["id"])
        if run is None:
            continue
        outcomes[request.key_name] = (run, True)
        events.append(_event(now, run, requested_by, "state_changed", RunState.requested.value,
                             {"trigger": trigger, "reason": request.reason, "idempotency_key": request.idempotency_key,
                              "emergency": False, "target_credential_type": run.target_credential_type}))
        # No "run.requested" line per run here: the caller logs one line per key it asked for
        # (detection's "rotation_due", with the run id), and a second line per key was a third
        # of a detection pass's time.
    for request, run in joins:
        outcomes[request.key_name] = (run, False)
        events.append(_event(now, run, requested_by, "request_joined", None,
                             {"trigger": trigger, "reason": request.reason, "idempotency_key": request.idempotency_key}))
    if events:  # one executemany (the ORM would insert them one by one on SQLite, to read back ids)
        session.execute(insert(AuditEvent.__table__), events)  # type: ignore[attr-defined]
    return outcomes


def _event(at: datetime, run: RotationRun, actor: str, event: str, to_state: Optional[str],
           detail: dict[str, Any]) -> dict[str, Any]:
    return {"at": at, "run_id": run.id, "key_id": run.key_id, "actor": actor, "event": event, "from_state": None,
            "to_state": to_state, "detail": detail}


def _usable_key(key: Optional[ManagedKey], name: str) -> ManagedKey:
    if key is None:
        raise UnknownKey(f"no managed key named {name!r}; check the name with `keyrotor status`")
    if not key.enabled:
        raise PermanentError(f"key {name!r} is disabled in the inventory; enable it to rotate it")
    return key


def _existing_runs(session: Session, idempotency_keys: Sequence[str], key_ids: Sequence[int]) -> dict[Any, RotationRun]:
    """Runs holding one of the idempotency keys, or open for one of the keys: one query."""
    if not idempotency_keys and not key_ids:
        return {}
    runs = session.exec(select(RotationRun).where(or_(
        col(RotationRun.idempotency_key).in_(list(idempotency_keys)),
        and_(col(RotationRun.key_id).in_(list(key_ids)), col(RotationRun.finished_at).is_(None))))).all()
    found: dict[Any, RotationRun] = {}
    for run in runs:
        if run.idempotency_key is not None:
            found[("idem", run.idempotency_key)] = run
        if run.finished_at is None:
            found[("open", run.key_id)] = run
    return found


def _found(existing: dict[Any, RotationRun], key: ManagedKey, idempotency_key: str) -> Optional[RotationRun]:
    """The run this request joins, as ``request_rotation``'s ``_existing`` decides it."""
    run = existing.get(("idem", idempotency_key))
    if run is not None:
        if run.key_id != key.id:
            raise PermanentError(f"idempotency key {idempotency_key!r} was already used for another key; "
                                 "use a fresh one per request")
        return run
    return existing.get(("open", key.id))


def _insert_runs(session: Session, dialect: str, rows: list[dict[str, Any]]) -> dict[str, RotationRun]:
    """Insert the runs in one statement, skipping any a unique index refuses; the runs inserted,
    by id, loaded from ``RETURNING`` (building 100 models in Python cost more than the insert).
    Rows go in key order, so two concurrent batches take the index entries' locks in one order."""
    if not rows:
        return {}
    rows = sorted(rows, key=lambda row: row["key_id"])
    # Many parameter sets to one statement: SQLAlchemy sends them as one multi-row INSERT
    # ("insertmanyvalues") and compiles the statement once, not once per batch size.
    statement = _INSERTS[dialect](RotationRun).on_conflict_do_nothing().returning(RotationRun)
    return {run.id: run for run in session.scalars(statement, rows).all()}
