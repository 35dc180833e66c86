"""Loading runs and moving them on: the conditional UPDATE that makes steps race-safe.

``transition`` is the one authority for a run's state: every move (steps, failures, deposits,
resolve, takeover, the reconciler) goes through it. It checks the move against the protocol
(``InvalidTransition`` for one the protocol forbids in the run's mode), runs
``UPDATE rotation_run SET state=:to … WHERE id=:id AND state=:expected``, clears the lease, writes
the audit event in the same transaction (invariant 6) and, once the transaction commits, counts
an outcome in ``keyrotor_rotations_total``. A row count other than 1 means another worker (or a
duplicate message) already moved the run, and is raised as ``StateConflict`` so the caller rolls
back its transaction and drops the message.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Optional, Sequence

from sqlalchemy import Table, bindparam, insert, update
from sqlalchemy import select as core_select
from sqlalchemy.orm import aliased
from sqlmodel import col, select, Session

from worker.clock import utcnow
from worker.db.models import AuditEvent, KeyVersion, ManagedKey, RotationRun
from worker.db.session import after_commit
from worker.db.statements import PerThreadCache
from worker.errors import StateConflict
from worker.metrics import ROTATIONS
from worker.pipeline.lease import transitioned
from worker.pipeline.row_writes import ConditionalWrite, InsertRow, as_ctes, execute_writes, params_of
from worker.protocol import check_transition
from worker.protocol.states import OUTCOME_STATES, TERMINAL_STATES, RunState


def run_state(run: RotationRun) -> RunState:
    return run.state if isinstance(run.state, RunState) else RunState(run.state)


def load_run(session: Session, run_id: str) -> Optional[RotationRun]:
    return session.get(RotationRun, run_id, populate_existing=True)


def load_key(session: Session, run: RotationRun) -> ManagedKey:
    key = session.get(ManagedKey, run.key_id)
    if key is None:  # pragma: no cover - FK guarantees it
        raise StateConflict(f"run {run.id} refers to a missing key id {run.key_id}")
    return key


def load_version(session: Session, version_id: Optional[int]) -> Optional[KeyVersion]:
    return session.get(KeyVersion, version_id) if version_id is not None else None


_AUDIT: Table = AuditEvent.__table__  # type: ignore[attr-defined]
_INSERT_AUDIT = insert(_AUDIT)
#: The run table, for UPDATEs that need no ORM bookkeeping.
RUNS: Table = RotationRun.__table__  # type: ignore[attr-defined]


def _audit_values(run: RotationRun, *, actor: str, event: str, from_state: Optional[str] = None,
                  to_state: Optional[str] = None, detail: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    return {"at": utcnow(), "run_id": run.id, "key_id": run.key_id, "actor": actor, "event": event,
            "from_state": from_state, "to_state": to_state, "detail": dict(detail or {})}


def audit(session: Session, run: RotationRun, *, actor: str, event: str, from_state: Optional[str] = None,
          to_state: Optional[str] = None, detail: Optional[dict[str, Any]] = None) -> None:
    # A Core INSERT, not ``session.add``: an audit row is never read back in the same session, and
    # the ORM's unit of work cost more CPU than the statement (nine audit rows per rotation); on the
    # session's connection, past the ORM's execute machinery, for the same reason.
    session.connection().execute(_INSERT_AUDIT, _audit_values(run, actor=actor, event=event, from_state=from_state,
                                                              to_state=to_state, detail=detail))


def audit_row(run: RotationRun, *, actor: str, event: str, detail: Optional[dict[str, Any]] = None) -> InsertRow:
    """An audit event as a write that goes with others in one statement (``execute_writes``)."""
    return InsertRow(_AUDIT, _audit_values(run, actor=actor, event=event, detail=detail))


#: Each thread builds its own (worker/db/statements.py: a shared statement's first compile raced).
_TRANSITIONS: PerThreadCache[Any] = PerThreadCache()
_AUDIT_COLUMNS = ("at", "run_id", "key_id", "actor", "event", "from_state", "to_state", "detail")


def _run_update(columns: tuple[str, ...]) -> Any:
    """``UPDATE rotation_run SET <columns> WHERE id = :t_id AND state = :t_expected``, with bind
    parameters. On the table, not the mapped class: nothing in the session mirrors the row, and
    the ORM's bulk-update machinery costs more than the statement. A new object for each
    statement built on it (``.returning()`` copies it, sharing its parts)."""
    return (update(RUNS).where(RUNS.c.id == bindparam("t_id"), RUNS.c.state == bindparam("t_expected"))
            .values({name: bindparam(f"t_{name}") for name in columns}))


def _transition_statement(columns: tuple[str, ...], *, returning: bool, audited: bool,
                          writes: Sequence[ConditionalWrite] = ()) -> Any:
    """The transition's statement for this set of columns (and shapes of ``writes``), built once
    (building it per call, with its values coerced each time, cost more CPU than running it).
    A hand-off needs the run back as an object (the next step's snapshot), so ``returning`` goes
    through the ORM with RETURNING instead of reading the row again. ``audited`` (PostgreSQL): with
    its audit row and the step's ``writes`` in the same statement (``_with_audit_row``)."""
    def build() -> Any:
        if audited:
            return _with_audit_row(_run_update(columns), returning=returning, writes=writes)
        if returning:
            return (update(RotationRun).where(RUNS.c.id == bindparam("t_id"), RUNS.c.state == bindparam("t_expected"))
                    .values({name: bindparam(f"t_{name}") for name in columns}).returning(RotationRun)
                    .execution_options(synchronize_session=False, populate_existing=True))
        return _run_update(columns)

    return _TRANSITIONS.get((columns, returning, audited, tuple(write.shape for write in writes)), build)


def _with_audit_row(update_run: Any, *, returning: bool, writes: Sequence[ConditionalWrite] = ()) -> Any:
    """The run's UPDATE, its audit row and the step's writes as one statement (a data-modifying
    CTE): a transition is one round trip instead of one per row. The audit row and the writes
    happen only for a row the UPDATE moved (they read its ``RETURNING``); the statement returns
    the moved run (as the ORM object when ``returning``, else its id), nothing when the run had
    moved on."""
    moved = update_run.returning(*(RUNS.c if returning else (RUNS.c.id, RUNS.c.key_id))).cte("moved")
    audit_row = core_select(bindparam("a_at", type_=_AUDIT.c.at.type), moved.c.id, moved.c.key_id,
                            *(bindparam(f"a_{name}", type_=_AUDIT.c[name].type) for name in _AUDIT_COLUMNS[3:]))
    logged = insert(_AUDIT).from_select(list(_AUDIT_COLUMNS), audit_row).cte("logged")
    ctes = [logged, *as_ctes(writes, core_select(moved.c.id).exists())]
    if returning:
        return core_select(aliased(RotationRun, moved)).add_cte(*ctes).execution_options(populate_existing=True)
    return core_select(moved.c.id).add_cte(*ctes)


def transition(
    session: Session,
    run: RotationRun,
    to: RunState,
    *,
    actor: str,
    detail: Optional[dict[str, Any]] = None,
    deadline_s: Optional[float] = None,
    refresh: bool = True,
    still: tuple[Any, ...] = (),
    lease: Optional[tuple[str, datetime]] = None,
    writes: Sequence[ConditionalWrite] = (),
    provider: Optional[str] = None,
    **fields: Any,
) -> RotationRun:
    """Move ``run`` from its current (expected) state to ``to``, conditionally; audit it.

    ``deadline_s``: seconds until the reconciler may consider the run stuck (``None`` clears it:
    the run waits for a person or is over). Extra ``fields`` are column values to set.
    ``still``: further conditions on the row that must hold (the reconciler's "still stuck").
    ``refresh=False``: skip re-reading the row for the return value (returns ``run`` as it was
    passed in) when the caller does not use it.
    ``lease``: (owner, until) to hold the run's lease after the move instead of clearing it (a
    chain's next step, ``worker/pipeline/handoff.py``); the run is then returned as the UPDATE
    left it (``RETURNING``).
    ``writes``: the step's own rows, made only if the run moves. On PostgreSQL they go in the
    transition's statement, so a step's durable point is one round trip (and, in a session of its
    own, needs no BEGIN and COMMIT: ``session_scope(one_statement=True)``); elsewhere they run
    first, and a ``StateConflict`` rolls them back with the transaction.
    ``provider``: the key's provider, to label an outcome's count (else the key is read).
    """
    expected = run_state(run)
    check_transition(run.mode, expected, to)
    now = utcnow()
    # Moving on ends the current execution's lease (worker/pipeline/lease.py), or hands it to the
    # chain's next step, in the same UPDATE.
    lease_owner, lease_until = lease if lease is not None else (None, None)
    values: dict[str, Any] = {"state": to.value, "updated_at": now, "attempts": 0, "requeues": 0,
                              "lease_owner": lease_owner, "lease_until": lease_until, **fields}
    values["step_deadline_at"] = now + timedelta(seconds=deadline_s) if deadline_s is not None else None
    if to in TERMINAL_STATES:
        values["finished_at"] = now
        values["step_deadline_at"] = None
    if session.new or session.dirty or session.deleted:  # the caller's pending rows go first
        session.flush()
    moved: Optional[RotationRun] = None
    connection = session.connection()
    audited = connection.dialect.name == "postgresql" and not still  # SQLite has no data-modifying CTE
    if not audited:
        execute_writes(session, writes)
    if still:
        result = connection.execute(
            update(RUNS).where(RUNS.c.id == run.id, RUNS.c.state == expected.value, *still).values(**values))
        found = result.rowcount == 1
    else:
        columns, returning = tuple(sorted(values)), lease is not None
        params = {"t_id": run.id, "t_expected": expected.value, **{f"t_{name}": v for name, v in values.items()}}
        if audited:
            params.update({"a_at": now, "a_actor": actor, "a_event": "state_changed", "a_from_state": expected.value,
                           "a_to_state": to.value, "a_detail": dict(detail or {}), **params_of(writes)})
        statement = _transition_statement(columns, returning=returning, audited=audited,
                                          writes=writes if audited else ())
        if not returning:
            result = connection.execute(statement, params)
            found = result.first() is not None if audited else result.rowcount == 1
        else:
            moved = session.execute(statement, params).scalars().first()
            found = moved is not None
    if not found:
        raise StateConflict(f"run {run.id} is no longer {expected.value}; another worker moved it")
    if not audited:
        audit(session, run, actor=actor, event="state_changed", from_state=expected.value, to_state=to.value,
              detail=detail)
    # The current execution's lease went with the UPDATE (nothing left to release once committed).
    after_commit(session, transitioned)
    if to in OUTCOME_STATES:
        if provider is None:
            key = session.get(ManagedKey, run.key_id)
            provider = key.provider if key is not None else "unknown"
        label = provider
        after_commit(session, lambda: ROTATIONS.labels(provider=label, outcome=to.value).inc())
    if moved is not None:
        return moved
    if not refresh:
        return run
    refreshed = load_run(session, run.id)
    assert refreshed is not None
    return refreshed


def note_attempt(session: Session, run: RotationRun, *, actor: str, step: str, error: str, delay_s: float,
                 time_limit_s: float) -> bool:
    """Record a failed attempt that will be retried; ``False`` if the run moved meanwhile."""
    now = utcnow()
    result = session.exec(
        update(RotationRun)
        .where(col(RotationRun.id) == run.id, col(RotationRun.state) == run_state(run).value)
        .values(attempts=RotationRun.attempts + 1, last_error=error, updated_at=now,
                step_deadline_at=now + timedelta(seconds=delay_s + time_limit_s))
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return False
    audit(session, run, actor=actor, event="step_retry",
          detail={"step": step, "error": error, "retry_in_s": round(delay_s, 3)})
    return True


def open_run_for_key(session: Session, key_id: int) -> Optional[RotationRun]:
    return session.exec(
        select(RotationRun).where(col(RotationRun.key_id) == key_id, col(RotationRun.finished_at).is_(None))
    ).first()


def extend_deadline(session: Session, run: RotationRun, *, delay_s: float, time_limit_s: float) -> bool:
    """A step that polls (``again_in_s``) moves the reconciler's deadline past its next look, so a
    long but bounded wait (a rollout) is not taken for a lost message; ``False`` if the run moved."""
    result = session.exec(
        update(RotationRun)
        .where(col(RotationRun.id) == run.id, col(RotationRun.state) == run_state(run).value)
        .values(step_deadline_at=utcnow() + timedelta(seconds=delay_s + time_limit_s))
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1
