"""Per-run leases: at most one execution of a step does its external effect at a time.

The conditional transition (``UPDATE … WHERE state = :expected``) makes the *second* of two
overlapping executions lose at the end — but both may already have called the provider (two keys
minted for one run, a revocation racing a rollback). So before its effect an execution claims the
run:

    UPDATE rotation_run SET lease_owner = :me, lease_until = :now + ttl
    WHERE id = :id AND state = :expected
      AND (lease_until IS NULL OR lease_until < :now OR lease_owner = :me)

Row count 0 means another execution holds it (``LeaseHeld``: the message comes back when the lease
would expire, and is dropped then if the run moved on) or the run moved on. While the step runs a
thread (one per process) renews the lease every ``ttl / 3``, for at most the step's time limit; the transition
clears it in the same transaction as the state change, and the execution releases it when it ends
without one (retry, polling, error). A worker killed mid-step stops renewing, so its lease lapses
within ``ttl`` and a redelivered message proceeds — re-running a step is safe (invariant 7), two
*concurrent* runs of it are what the lease prevents.
"""

from __future__ import annotations

import threading
import time
import uuid
from contextvars import ContextVar
from datetime import datetime, timedelta
from typing import Any, Optional

from sqlalchemy import bindparam, or_, update
from sqlalchemy.engine import Engine
from sqlmodel import col, Session

from worker import log
from worker.clock import as_utc, utcnow
from worker.db.models import RotationRun
from worker.db.session import session_scope
from worker.errors import StateConflict

logger = log.get_logger("keyrotor.pipeline.lease")


class LeaseHeld(StateConflict):
    """Another execution of this step holds the run's lease until ``until``."""

    def __init__(self, run_id: str, owner: Optional[str], until: Optional[datetime]) -> None:
        super().__init__(f"run {run_id} is leased to {owner or 'another execution'} until "
                         f"{until.isoformat() if until else 'unknown'}; this execution waits")
        self.owner, self.until = owner, until


def claim(session: Session, run_id: str, expected_state: str, owner: str, ttl_s: float) -> bool:
    """The conditional UPDATE above; ``True`` if ``owner`` holds the lease now (re-entrant)."""
    now = utcnow()
    result = session.exec(
        update(RotationRun)
        .where(col(RotationRun.id) == run_id, col(RotationRun.state) == expected_state,
               or_(col(RotationRun.lease_until).is_(None), col(RotationRun.lease_until) < now,
                   col(RotationRun.lease_owner) == owner))
        .values(lease_owner=owner, lease_until=now + timedelta(seconds=ttl_s))
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def release(engine: Engine, run_id: str, owner: str) -> bool:
    """Clear the lease if ``owner`` still holds it (the transition usually cleared it already)."""
    with session_scope(engine) as session:
        result = session.exec(
            update(RotationRun)
            .where(col(RotationRun.id) == run_id, col(RotationRun.lease_owner) == owner)
            .values(lease_owner=None, lease_until=None)
            .execution_options(synchronize_session=False)
        )
        return result.rowcount == 1


def _extend(engine: Engine, run_id: str, owner: str, ttl_s: float) -> bool:
    with session_scope(engine) as session:
        result = session.exec(
            update(RotationRun)
            .where(col(RotationRun.id) == run_id, col(RotationRun.lease_owner) == owner)
            .values(lease_until=utcnow() + timedelta(seconds=ttl_s))
            .execution_options(synchronize_session=False)
        )
        return result.rowcount == 1


#: ``claim`` on the table with bind parameters (``Lease.claim_params``), built once: a step's
#: snapshot makes it the CTE of the one statement that claims the run and reads what the step acts
#: on (``steps.common.load_snapshot``).
CLAIM_UPDATE = (
    update(RotationRun.__table__)  # type: ignore[attr-defined]
    .where(col(RotationRun.id) == bindparam("claim_run"), col(RotationRun.state) == bindparam("claim_state"),
           or_(col(RotationRun.lease_until).is_(None), col(RotationRun.lease_until) < bindparam("claim_now"),
               col(RotationRun.lease_owner) == bindparam("claim_owner")))
    .values(lease_owner=bindparam("claim_owner"), lease_until=bindparam("claim_until"))
)

def new_owner(actor: str) -> str:
    """A lease owner: the actor (``worker:<host>``) and a random part naming one execution (or one chain)."""
    return f"{actor}:{uuid.uuid4().hex[:16]}"[-200:]


class _Renewer:
    """One thread per process renews every held lease every ``ttl / 3`` (a thread per step
    execution cost a thread start and join per step)."""

    def __init__(self) -> None:
        self._leases: dict[int, "Lease"] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: Optional[threading.Thread] = None
        self._wakes_at = float("inf")  # when the thread looks next (monotonic); inf: it waits for a lease

    def add(self, lease: "Lease") -> None:
        with self._lock:
            self._leases[id(lease)] = lease
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="lease-renewer", daemon=True)
                self._thread.start()
            # Wake the thread only if it would look too late for this lease: on a busy worker it is
            # already waiting for an earlier renewal, and a wake-up per step cost a thread switch.
            if lease.next_renewal < self._wakes_at:
                self._wakes_at = lease.next_renewal
                self._wake.notify()

    def remove(self, lease: "Lease") -> None:
        with self._lock:
            self._leases.pop(id(lease), None)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._leases:
                    self._wakes_at = float("inf")
                    self._wake.wait()
                now = time.monotonic()
                due = [lease for lease in self._leases.values() if lease.next_renewal <= now]
                wait_s = min(lease.next_renewal for lease in self._leases.values()) - now
                if not due:
                    self._wakes_at = now + max(0.01, wait_s)
                    self._wake.wait(timeout=max(0.01, wait_s))
                    continue
            for lease in due:
                if not lease.renew():
                    self.remove(lease)


_renewer = _Renewer()


class Lease:
    """One execution's lease on one run: ``acquire`` (or ``CLAIM_UPDATE`` with ``claim_params``)
    in the step's snapshot transaction, then ``start_renewing``; ``close`` (always) stops renewing
    and releases what is still held."""

    def __init__(self, engine: Engine, run_id: str, *, actor: str, ttl_s: float, max_s: float,
                 owner: Optional[str] = None) -> None:
        self.engine, self.run_id, self.ttl_s, self.max_s = engine, run_id, ttl_s, max_s
        self.owner = owner or new_owner(actor)
        self.held = False
        self.next_renewal = 0.0
        self._started = 0.0
        self._renewing = False

    def claim_params(self, expected_state: str) -> dict[str, Any]:
        """The parameters of ``CLAIM_UPDATE`` for this execution; once its statement returned the
        run, ``claimed``."""
        now = utcnow()
        return {"claim_run": self.run_id, "claim_state": expected_state, "claim_now": now, "claim_owner": self.owner,
                "claim_until": now + timedelta(seconds=self.ttl_s)}

    def claimed(self) -> None:
        self.held = True

    def taken_over(self) -> None:
        """The lease was claimed for this execution already (a chain's hand-off): hold it."""
        self.held = True

    def acquire(self, session: Session, expected_state: str) -> None:
        """Claim the run in ``session`` (the caller commits); ``LeaseHeld`` if another has it."""
        if claim(session, self.run_id, expected_state, self.owner, self.ttl_s):
            self.held = True
            return
        row = session.get(RotationRun, self.run_id, populate_existing=True)
        raise LeaseHeld(self.run_id, row.lease_owner if row else None,
                        as_utc(row.lease_until) if row is not None and row.lease_until is not None else None)

    def start_renewing(self) -> None:
        if not self.held or self._renewing:
            return
        self._renewing = True
        self._started = time.monotonic()
        self.next_renewal = self._started + self.ttl_s / 3
        _renewer.add(self)

    def renew(self) -> bool:
        """Extend the lease (the renewer thread calls it); ``False``: stop renewing it."""
        if time.monotonic() - self._started > self.max_s:
            # Past the step's time limit the execution is presumed dead or stuck: let it lapse.
            logger.warning("lease.not_renewed", run_id=self.run_id, reason="step time limit passed")
            return False
        self.next_renewal = time.monotonic() + self.ttl_s / 3
        try:
            return _extend(self.engine, self.run_id, self.owner, self.ttl_s)  # False: transitioned or taken over
        except Exception as exc:  # a DB hiccup: try again next tick; the lease may lapse meanwhile
            logger.warning("lease.renew_failed", run_id=self.run_id, error=type(exc).__name__)
            return True

    def close(self) -> None:
        if self._renewing:
            _renewer.remove(self)
            self._renewing = False
        if self.held:
            try:
                release(self.engine, self.run_id, self.owner)
            except Exception as exc:  # it lapses within ttl_s anyway
                logger.warning("lease.release_failed", run_id=self.run_id, error=type(exc).__name__)
            self.held = False


def transitioned() -> None:
    """The current execution's transition has committed; its UPDATE cleared the lease, so there
    is nothing left for ``close`` to release (saves a round trip per step; renewal stops on its
    own, its UPDATE no longer matches)."""
    lease = current_lease.get()
    if lease is not None:
        lease.held = False


#: The lease of the step execution running in this thread (set by ``steps.execute``).
current_lease: ContextVar[Optional[Lease]] = ContextVar("keyrotor_current_lease", default=None)
