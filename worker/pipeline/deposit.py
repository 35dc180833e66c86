"""Assisted mode: a person deposits the new credential (``keyrotor deposit RUN``).

The secret goes straight to the run's Vault staging path; the run moves awaiting_deposit → issued
and continues as usual (precheck, promote, propagate, verify, retire).
"""

from __future__ import annotations

from typing import Optional

from worker.db.models import RunState
from worker.db.session import session_scope
from worker.errors import PermanentError
from worker.pipeline.context import PipelineContext, get_context
from worker.pipeline.effects import holding, read_pending
from worker.pipeline.runs import load_key, load_run, run_state, transition
from worker.protocol import Step
from worker.secret import Secret


def deposit(*, run_id: str, secret: Secret, deposited_by: str, ctx: Optional[PipelineContext] = None,
            enqueue: bool = True) -> RunState:
    """Stage ``secret`` for an assisted run and move it on; idempotent for the same secret."""
    from worker.pipeline.steps.common import Snapshot, _deadline_s
    from worker.pipeline.steps.versions import _record_new_version
    from worker.protocol import parse_mode

    ctx = ctx or get_context()
    with session_scope(ctx.engine) as session:
        run = load_run(session, run_id)
        if run is None:
            raise PermanentError(f"no run {run_id!r}")
        key = load_key(session, run)
    state = run_state(run)
    with holding(secret):
        staged = read_pending(ctx.vault, run_id)
        if state != RunState.awaiting_deposit:
            if staged is not None and staged[0] == secret:
                return state  # the same deposit, delivered twice
            raise PermanentError(f"run {run_id} is {state.value}, not awaiting_deposit; nothing to deposit")
        current = ctx.vault.read_current(key.vault_mount, key.vault_path, key.vault_field)
        if current is not None and current.secret == secret:
            raise PermanentError("that is the credential in use now; create a new one at the provider and deposit it")
        ctx.vault.stage_pending(run_id, secret, None)
    snap = Snapshot(run=run, key=key, old=None, new=None, mode=parse_mode(run.mode))
    with session_scope(ctx.engine) as session:
        new_id = _record_new_version(session, snap, secret=secret, key_id=None, name=None, expires_at=None)
        transition(session, run, RunState.issued, actor=deposited_by, new_version_id=new_id,
                   deadline_s=_deadline_s(ctx, RunState.issued),
                   detail={"fingerprint": secret.fingerprint, "deposited_by": deposited_by})
    if enqueue:
        from worker.pipeline.actors import send_step

        send_step(Step.precheck, run_id)
    return RunState.issued
