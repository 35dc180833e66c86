"""An emergency takes over a key's open run that waits for a person.

Joining such a run (``needs_attention``, ``awaiting_deposit``) would leave the key alone: in a
breach, a silent no-op. Instead, through the protocol's legal transitions and never revoking a
key Vault serves:

- nothing issued (stopped before any key existed, or waiting for a deposit): the run is
  ``cancelled`` and the caller starts a fresh emergency run;
- otherwise, where the run can resume (``retry`` from where it stopped: a key issued and staged
  but not promoted, a promoted key not yet verified or retired, a clean-up under way): it resumes
  as an emergency — no grace period, so the exposed key is revoked once the new one verifies;
- else the run is left for a person (``None``): the caller reports the key as not rotated.

Every takeover is audited (``emergency_takeover`` in ``detail.resolution``, actor = the requester).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from sqlmodel import Session

from worker.clock import utcnow
from worker.db.models import RotationRun
from worker.protocol.states import WAITING_STATES, RunState
from worker.pipeline.resolve import discard_deposit, resolution_options, stopped_in
from worker.pipeline.outbox import enqueue_after_commit, enqueue_run
from worker.pipeline.runs import run_state, transition
from worker.pipeline.context import default_policy
from worker.vault.secret_store import SecretStore

S = RunState
Outcome = Literal["cancelled", "resumed"]

#: Open runs an emergency takes over instead of joining.
TAKEOVER_STATES = WAITING_STATES  # a person acts next: an emergency takes over


def take_over(session: Session, run: RotationRun, *, requested_by: str, reason: str,
              vault: SecretStore | None = None) -> Optional[Outcome]:
    """End or resume ``run`` for an emergency (see the module doc); ``None``: a person must look.

    Resumed runs are enqueued once ``session`` commits; for ``"cancelled"`` the caller creates
    the fresh run in the same transaction."""
    state = run_state(run)
    options = resolution_options(session, run, vault)
    stopped = stopped_in(session, run) if state == S.needs_attention else state
    detail: dict[str, Any] = {"resolution": "emergency_takeover", "reason": reason, "previous_error": run.last_error,
                              "stopped_in": stopped.value if stopped is not None else None}
    if options.get("cancel") == S.cancelled:
        if state == S.awaiting_deposit:
            discard_deposit(run, vault)
        transition(session, run, S.cancelled, actor=requested_by, deadline_s=None,
                   detail={**detail, "superseded": "a fresh emergency run replaces this one"})
        return "cancelled"
    target = options.get("retry")
    if target is None:
        return None

    extra: dict[str, Any] = {"grace_until": utcnow()} if target == S.verified else {}  # no grace in a breach
    moved = transition(session, run, target, actor=requested_by, emergency=True, last_error=None, **extra,
                       deadline_s=2 * default_policy().time_limit_ms / 1000,
                       detail={**detail, "resumed_as_emergency": True})
    enqueue_after_commit(session, moved, enqueue_run)
    return "resumed"
