"""Loading runs and moving them on: the conditional UPDATE that makes steps race-safe.

``transition`` is the one authority for a run's state: every move (steps, failures, deposits,
resolve, takeover, the reconciler) goes through it, or through ``transition_alone``, the same
move as a statement of its own on a connection in autocommit (a step's usual durable point). It
checks the move against the protocol
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
from sqlalchemy.engine import Connection
from sqlmodel import col, select, Session

from worker.clock import utcnow
from worker.db.models import AuditEvent, KeyVersion, ManagedKey, RotationRun
from worker.db.session import after_commit
from worker.db import direct
from worker.db.direct import DirectStatements, Loader
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


#: Compiled once per shape, shared by the threads (worker/db/direct.py).
_TRANSITIONS = DirectStatements()
_AUDIT_COLUMNS = ("at", "run_id", "key_id", "actor", "event", "from_state", "to_state", "detail")
_RUN_LOADER = Loader(RotationRun)


def _run_update(columns: tuple[str, ...]) -> Any:
    """``UPDATE rotation_run SET <columns> WHERE id = :t_id AND state = :t_expected``, with bind
    parameters. On the table, not the mapped class: nothing in the session mirrors the row, and
    the ORM's bulk-update machinery costs more than the statement."""
    return (update(RUNS).where(RUNS.c.id == bindparam("t_id"), RUNS.c.state == bindparam("t_expected"))
            .values({name: bindparam(f"t_{name}") for name in columns}))


def _with_audit_row(columns: tuple[str, ...], *, returning: bool, writes: Sequence[ConditionalWrite] = ()) -> Any:
    """The run's UPDATE, its audit row and the step's writes as one statement (a data-modifying
    CTE): a transition is one round trip instead of one per row. The audit row and the writes
    happen only for a row the UPDATE moved (they read its ``RETURNING``); the statement returns
    the moved run (all its columns when ``returning``, else its id), nothing when the run had
    moved on. Built once per shape (building it per call, with its values coerced each time, cost
    more CPU than running it)."""
    moved = _run_update(columns).returning(*(RUNS.c if returning else (RUNS.c.id, RUNS.c.key_id))).cte("moved")
    audit_row = core_select(bindparam("a_at", type_=_AUDIT.c.at.type), moved.c.id, moved.c.key_id,
                            *(bindparam(f"a_{name}", type_=_AUDIT.c[name].type) for name in _AUDIT_COLUMNS[3:]))
    logged = insert(_AUDIT).from_select(list(_AUDIT_COLUMNS), audit_row).cte("logged")
    ctes = [logged, *as_ctes(writes, core_select(moved.c.id).exists())]
    return core_select(*(moved.c if returning else (moved.c.id,))).add_cte(*ctes)


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
    transition's statement, so a step's durable point is one round trip (and, sent on a connection
    of its own, needs no BEGIN and COMMIT: ``transition_alone``); elsewhere they run first, and a
    ``StateConflict`` rolls them back with the transaction.
    ``provider``: the key's provider, to label an outcome's count (else the key is read).
    """
    expected, now, values = _moved_values(run, to, deadline_s=deadline_s, lease=lease, fields=fields)
    if session.new or session.dirty or session.deleted:  # the caller's pending rows go first
        session.flush()
    moved: Optional[RotationRun] = None
    # PostgreSQL: one statement, sent directly (worker/db/direct.py). Elsewhere (SQLite has no
    # data-modifying CTE) the writes, the UPDATE and the audit row one after the other.
    audited = not still and direct.usable(session)
    if audited:
        found, moved = _send_with_audit_row(session, run, expected, to, now, values, actor=actor, detail=detail,
                                            returning=lease is not None, writes=writes)
    else:
        execute_writes(session, writes)
        result = session.connection().execute(
            update(RUNS).where(RUNS.c.id == run.id, RUNS.c.state == expected.value, *still).values(**values))
        found = result.rowcount == 1
        if found and lease is not None:
            moved = load_run(session, run.id)
    if not found:
        raise _moved_by_another(run, expected)
    if not audited:
        audit(session, run, actor=actor, event="state_changed", from_state=expected.value, to_state=to.value,
              detail=detail)
    if to in OUTCOME_STATES and provider is None:
        key = session.get(ManagedKey, run.key_id)
        provider = key.provider if key is not None else "unknown"
    label = provider or "unknown"
    after_commit(session, lambda: _committed(to, label))
    if moved is not None:
        return moved
    if not refresh:
        return run
    refreshed = load_run(session, run.id)
    assert refreshed is not None
    return refreshed


def transition_alone(
    connection: Connection,
    run: RotationRun,
    to: RunState,
    *,
    actor: str,
    provider: str,
    detail: Optional[dict[str, Any]] = None,
    deadline_s: Optional[float] = None,
    lease: Optional[tuple[str, datetime]] = None,
    writes: Sequence[ConditionalWrite] = (),
    **fields: Any,
) -> RotationRun:
    """``transition`` as a statement of its own on a PostgreSQL connection in autocommit
    (``statement_scope``), without an ORM session: the statement commits as it returns, so what
    ``transition`` leaves for its transaction's commit (the lease marked done, an outcome counted)
    happens here before returning. Returns the run as the UPDATE left it with ``lease``, else
    ``run`` as passed in. Arguments as ``transition``'s."""
    if not direct.usable(connection):
        raise ValueError("transition_alone needs PostgreSQL through psycopg; elsewhere use transition in a session")
    expected, now, values = _moved_values(run, to, deadline_s=deadline_s, lease=lease, fields=fields)
    found, moved = _send_with_audit_row(connection, run, expected, to, now, values, actor=actor, detail=detail,
                                        returning=lease is not None, writes=writes)
    if not found:
        raise _moved_by_another(run, expected)
    _committed(to, provider)
    return moved if moved is not None else run


def _moved_values(
    run: RotationRun, to: RunState, *, deadline_s: Optional[float], lease: Optional[tuple[str, datetime]],
    fields: dict[str, Any],
) -> tuple[RunState, datetime, dict[str, Any]]:
    """The run's expected state (the move checked against the protocol), the time of the move and
    the columns the UPDATE sets."""
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
    return expected, now, values


def _send_with_audit_row(bind: "Session | Connection", run: RotationRun, expected: RunState, to: RunState,
                         now: datetime, values: dict[str, Any], *, actor: str, detail: Optional[dict[str, Any]],
                         returning: bool, writes: Sequence[ConditionalWrite]) -> tuple[bool, Optional[RotationRun]]:
    """The UPDATE, its audit row and ``writes`` as one statement (``_with_audit_row``), sent
    directly: (whether the run moved, the moved run when ``returning``)."""
    columns = tuple(sorted(values))
    statement = _TRANSITIONS.get((columns, returning, tuple(write.shape for write in writes)), direct.dialect_of(bind),
                                 lambda: _with_audit_row(columns, returning=returning, writes=writes))
    rows = direct.execute(bind, statement, {
        "t_id": run.id, "t_expected": expected.value, **{f"t_{name}": v for name, v in values.items()},
        "a_at": now, "a_actor": actor, "a_event": "state_changed", "a_from_state": expected.value,
        "a_to_state": to.value, "a_detail": dict(detail or {}), **params_of(writes)})
    return bool(rows), (_RUN_LOADER.load(rows[0]) if rows and returning else None)


def _moved_by_another(run: RotationRun, expected: RunState) -> StateConflict:
    return StateConflict(f"run {run.id} is no longer {expected.value}; another worker moved it")


def _committed(to: RunState, provider: str) -> None:
    """A transition has committed: the current execution's lease went with its UPDATE (nothing
    left to release), and an outcome is counted."""
    transitioned()
    if to in OUTCOME_STATES:
        ROTATIONS.labels(provider=provider, outcome=to.value).inc()


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
