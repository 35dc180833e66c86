"""Follow runs as they move, from the audit trail (the database is the record, not the queue).

``rotate --wait`` and ``keyrotor demo`` print one line per state change. Reading the audit trail
by increasing id, rather than sampling run states, means no transition is missed even when a
step moves faster than the poll interval.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable

from sqlalchemy.engine import Engine
from sqlmodel import col, select

from worker.cli.output import short_fp
from worker.clock import as_utc
from worker.db.models import AuditEvent, ManagedKey, RotationRun
from worker.protocol.states import OUTCOME_STATES
from worker.db.session import session_scope

#: States after which nothing happens without a person (terminal, or parked for an operator).
STOP_STATES = frozenset(s.value for s in OUTCOME_STATES)  # over, or a person has to look


@dataclass(frozen=True)
class Change:
    at: datetime
    key: str
    run_id: str | None
    event: str
    from_state: str | None
    to_state: str | None
    actor: str
    detail: dict[str, Any]

    def line(self, *, clock: bool = True) -> str:
        """``12:00:01  alloy/reporting  issued → prechecked  fingerprint=1a2b3c4d`` (never a secret)."""
        if self.from_state or self.to_state:
            what = f"{self.from_state or '∅'} → {self.to_state or '∅'}"
        else:
            what = self.event
        text = f"{self.key:<16} {what:<26} {describe(self.detail)}".rstrip()
        return f"{self.at.strftime('%H:%M:%S')}  {text}" if clock else text


#: Audit details a person watching a run does not need on the one-line narration.
_QUIET_DETAILS = frozenset({"idempotency_key", "grace_until"})


def describe(detail: dict[str, Any], limit: int = 100) -> str:
    """A short human summary of an audit detail: fingerprints shortened, long values clipped."""
    parts = []
    for name, value in detail.items():
        if value in (None, "", [], {}, False) or name in _QUIET_DETAILS:
            continue
        if isinstance(value, str) and value.startswith("sha256:"):
            value = short_fp(value)
        elif isinstance(value, (dict, list)):
            value = _compact(value)
        parts.append(f"{name}={value}")
    text = " ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _compact(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}:{short_fp(v) if isinstance(v, str) and v.startswith('sha256:') else v}" for k, v in value.items())
    return ",".join(str(v) for v in value)


@dataclass
class AuditFollower:
    """Yields audit events newer than the last one seen, optionally only for some runs or keys."""

    engine: Engine
    run_ids: set[str] | None = None
    key_ids: set[int] | None = None
    last_id: int = 0
    _names: dict[int, str] = field(default_factory=dict)

    def start_from_now(self) -> None:
        """Skip everything already in the trail."""
        with session_scope(self.engine) as session:
            newest = session.exec(select(AuditEvent.id).order_by(col(AuditEvent.id).desc()).limit(1)).first()
        self.last_id = newest or 0

    def poll(self) -> list[Change]:
        with session_scope(self.engine) as session:
            query = select(AuditEvent).where(col(AuditEvent.id) > self.last_id)
            if self.run_ids is not None:
                query = query.where(col(AuditEvent.run_id).in_(self.run_ids))
            if self.key_ids is not None:
                query = query.where(col(AuditEvent.key_id).in_(self.key_ids))
            events = session.exec(query.order_by(col(AuditEvent.id)).limit(1000)).all()
            missing = {e.key_id for e in events if e.key_id is not None and e.key_id not in self._names}
            if missing:
                for key in session.exec(select(ManagedKey).where(col(ManagedKey.id).in_(missing))).all():
                    self._names[key.id or 0] = key.name
        changes = []
        for e in events:
            self.last_id = max(self.last_id, e.id or 0)
            changes.append(Change(
                at=as_utc(e.at) or datetime.min, key=self._names.get(e.key_id or -1, "-"), run_id=e.run_id,
                event=e.event, from_state=e.from_state, to_state=e.to_state, actor=e.actor, detail=e.detail or {},
            ))
        return changes


def run_states(engine: Engine, run_ids: Iterable[str]) -> dict[str, RotationRun]:
    with session_scope(engine) as session:
        rows = session.exec(select(RotationRun).where(col(RotationRun.id).in_(list(run_ids)))).all()
    return {r.id: r for r in rows}


def state_of(run: RotationRun) -> str:
    return run.state.value if hasattr(run.state, "value") else str(run.state)
