"""The keys a run minted, as the audit trail records them: the record staging is checked against.

An issue call's answer is written to the database (``new_key_minted``: fingerprint and provider
key id, never the secret) *before* the secret goes to staging, and a key the run gave up on is
recorded as discarded (``new_key_discarded``, with the provider's answer to the revocation). A
staged secret is trusted only when its fingerprint is a minted key of this run that was not
discarded — a staging write that timed out and landed later cannot bring a revoked key back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from sqlalchemy import Table, bindparam, or_, select
from sqlalchemy.engine import Connection
from sqlmodel import Session

from worker.db import direct
from worker.db.direct import DirectStatements
from worker.db.models import AuditEvent, RotationRun
from worker.pipeline.row_writes import UpdateRows, execute_writes
from worker.pipeline.runs import RUNS, audit, audit_row

MINTED = "new_key_minted"
DISCARDED = "new_key_discarded"


@dataclass(frozen=True)
class MintedKey:
    fingerprint: str
    provider_key_id: Optional[str]
    discarded: bool


_EVENTS: Table = AuditEvent.__table__  # type: ignore[attr-defined]
_STATEMENTS = DirectStatements()


def _minted_events() -> Any:
    return (select(_EVENTS.c.event, _EVENTS.c.detail)
            .where(_EVENTS.c.run_id == bindparam("run_id"),
                   or_(_EVENTS.c.event == bindparam("minted", MINTED), _EVENTS.c.event == bindparam("discarded", DISCARDED)))
            .order_by(_EVENTS.c.id))


def minted_keys(session: Session, run_id: str) -> list[MintedKey]:
    """Every key the run's issue calls returned, in order, with whether it was discarded since."""
    events = direct.fetch(session, _STATEMENTS, "minted", _minted_events, {"run_id": run_id})
    discarded = {detail.get("fingerprint") for event, detail in events if event == DISCARDED}
    return [MintedKey(fingerprint=str(detail.get("fingerprint")), provider_key_id=detail.get("provider_key_id"),
                      discarded=detail.get("fingerprint") in discarded)
            for event, detail in events if event == MINTED]


def record_minted(bind: "Session | Connection", run: RotationRun, *, actor: str, name: str, fingerprint: str,
                  provider_key_id: Optional[str]) -> None:
    """The issue call's answer, and the end of its unknown outcome (the run's issue mark cleared),
    in one statement on PostgreSQL: sent on a connection of its own (``statement_scope``), it
    needs no BEGIN and COMMIT."""
    execute_writes(bind, [
        audit_row(run, actor=actor, event=MINTED,
                  detail={"name": name, "fingerprint": fingerprint, "provider_key_id": provider_key_id}),
        UpdateRows(RUNS, {"id": run.id}, {"issue_unknown_since": None})])


def record_discarded(session: Session, run: RotationRun, *, actor: str, fingerprint: str,
                     provider_key_id: Optional[str], revocation: str, reason: str) -> None:
    audit(session, run, actor=actor, event=DISCARDED,
          detail={"fingerprint": fingerprint, "provider_key_id": provider_key_id, "revocation": revocation,
                  "reason": reason})
