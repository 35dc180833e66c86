"""The keys a run minted, as the audit trail records them: the record staging is checked against.

An issue call's answer is written to the database (``new_key_minted``: fingerprint and provider
key id, never the secret) *before* the secret goes to staging, and a key the run gave up on is
recorded as discarded (``new_key_discarded``, with the provider's answer to the revocation). A
staged secret is trusted only when its fingerprint is a minted key of this run that was not
discarded — a staging write that timed out and landed later cannot bring a revoked key back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from sqlmodel import Session, col, select

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


def minted_keys(session: Session, run_id: str) -> list[MintedKey]:
    """Every key the run's issue calls returned, in order, with whether it was discarded since."""
    events = session.exec(
        select(AuditEvent).where(AuditEvent.run_id == run_id, col(AuditEvent.event).in_([MINTED, DISCARDED]))
        .order_by(col(AuditEvent.id))
    ).all()
    discarded = {e.detail.get("fingerprint") for e in events if e.event == DISCARDED}
    return [MintedKey(fingerprint=str(e.detail.get("fingerprint")), provider_key_id=e.detail.get("provider_key_id"),
                      discarded=e.detail.get("fingerprint") in discarded)
            for e in events if e.event == MINTED]


def record_minted(session: Session, run: RotationRun, *, actor: str, name: str, fingerprint: str,
                  provider_key_id: Optional[str]) -> None:
    """The issue call's answer, and the end of its unknown outcome (the run's issue mark cleared),
    in one statement on PostgreSQL: sent in a session of its own, it needs no BEGIN and COMMIT."""
    execute_writes(session, [
        audit_row(run, actor=actor, event=MINTED,
                  detail={"name": name, "fingerprint": fingerprint, "provider_key_id": provider_key_id}),
        UpdateRows(RUNS, {"id": run.id}, {"issue_unknown_since": None})])


def record_discarded(session: Session, run: RotationRun, *, actor: str, fingerprint: str,
                     provider_key_id: Optional[str], revocation: str, reason: str) -> None:
    audit(session, run, actor=actor, event=DISCARDED,
          detail={"fingerprint": fingerprint, "provider_key_id": provider_key_id, "revocation": revocation,
                  "reason": reason})
