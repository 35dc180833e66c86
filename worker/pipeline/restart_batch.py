"""Which open runs a workload restart waits for (``kube_restarts.BatchView``, from the database).

A run belongs to a workload's batch when its key lists a ``kubernetes_secret`` integration that
names the workload. It has not pushed while it is in a state before ``propagated`` that a step
moves on by itself (a run waiting for a person — ``awaiting_deposit``, ``needs_attention`` — or one
scheduled for later does not hold the others back). Every worker process asks the same database,
so the batch is the same whichever process verifies.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import or_
from sqlalchemy.engine import Engine
from sqlmodel import col, select

from worker.clock import utcnow
from worker.db.models import IntegrationRecord, ManagedKey, RotationRun
from worker.protocol.states import RunState
from worker.db.session import session_scope
from worker.integrations.kube_api import ObjectRef

KIND = "kubernetes_secret"

#: Open states in which a run has not written its Secrets yet and will, without a person.
BEFORE_PUSH = (RunState.requested, RunState.issued, RunState.prechecked, RunState.promoted)


def names_workload(spec: Any, workload: ObjectRef) -> bool:
    """Whether a stored ``kubernetes_secret`` spec restarts ``workload``."""
    if not isinstance(spec, dict) or spec.get("namespace") != workload.namespace:
        return False
    return any(isinstance(w, dict) and w.get("kind") == workload.kind and w.get("name") == workload.name
               for w in spec.get("workloads") or [])


class DatabaseBatchView:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def unpushed_runs(self, workload: ObjectRef) -> list[str]:
        now = utcnow()
        with session_scope(self._engine) as session:
            integrations = {r.name for r in session.exec(select(IntegrationRecord).where(IntegrationRecord.kind == KIND))
                            if names_workload(r.spec, workload)}
            if not integrations:
                return []
            rows = session.exec(
                select(RotationRun.id, ManagedKey.integrations)
                .join(ManagedKey, col(ManagedKey.id) == col(RotationRun.key_id))
                .where(col(RotationRun.state).in_([s.value for s in BEFORE_PUSH]))
                .where(or_(col(RotationRun.not_before).is_(None), col(RotationRun.not_before) <= now))
            ).all()
        return sorted(run_id for run_id, used in rows if integrations.intersection(used or []))
