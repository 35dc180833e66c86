"""Assisted mode: a person hands over the new credential.

Two ways in, one acceptance: the owner writes it to the key's deposit path in Vault (picked up by
the scheduler's ``deposits`` job, ``worker/service/deposits.py``), or an operator runs ``keyrotor deposit``.
Either way the credential is checked at the provider *before* it is accepted (``DepositRejected``
names the reason and the run keeps waiting), then goes to the run's Vault staging path; the run
moves awaiting_deposit → issued and continues as usual (precheck, promote, propagate, verify,
retire).
"""

from __future__ import annotations

import time
from typing import Any, Optional

from worker.protocol.states import RunState
from worker.db.session import session_scope
from worker.errors import PermanentError
from worker.pipeline.context import PipelineContext, get_context
from worker.pipeline.effects import enum_value, holding, parse_seconds, read_pending
from worker.pipeline.outbox import enqueue_after_commit, enqueue_run
from worker.pipeline.runs import load_key, load_run, run_state, transition
from worker.protocol import parse_mode
from worker.secret import Secret
from worker.db.models import ProviderRecord
from worker.pipeline.steps.common import Snapshot, step_deadline_s
from worker.pipeline.steps.versions import record_new_version
from worker.providers.base import wait_until_live


class DepositRejected(PermanentError):
    """The deposited credential is not acceptable (the provider rejects it, or it is the one in use)."""


def check_at_provider(ctx: PipelineContext, key: Any, secret: Secret, credential_type: str) -> str:
    """``valid`` | ``invalid`` | ``deprecated``: the provider's answer for ``secret``, waiting up to
    the provider's activation timeout for a credential that is not live yet."""
    with session_scope(ctx.engine) as session:
        record = session.get(ProviderRecord, key.provider)
        activation = (record.spec or {}).get("activation") or {} if record is not None else {}
        provider = ctx.provider_factory(session, key)
    with holding(secret):
        outcome = wait_until_live(provider, secret, credential_type,
                                  timeout=parse_seconds(activation.get("timeout"), ctx.policy.activation_timeout_s),
                                  poll_interval=parse_seconds(activation.get("poll_interval"), ctx.policy.activation_poll_s),
                                  sleep=time.sleep, monotonic=time.monotonic)
    return str(enum_value(outcome))


def deposit(*, run_id: str, secret: Secret, deposited_by: str, ctx: Optional[PipelineContext] = None,
            enqueue: bool = True, detail: Optional[dict[str, Any]] = None, check: bool = True) -> RunState:
    """Check ``secret`` at the provider, stage it for an assisted run and move the run on;
    idempotent for the same secret. ``DepositRejected`` when it does not work (nothing staged)."""
    ctx = ctx or get_context()
    with session_scope(ctx.engine) as session:
        run = load_run(session, run_id)
        if run is None:
            raise PermanentError(f"no run {run_id!r}")
        key = load_key(session, run)
    state = run_state(run)
    credential_type = run.target_credential_type or key.credential_type
    with holding(secret):
        staged = read_pending(ctx.vault, run_id)
        if state != RunState.awaiting_deposit:
            if staged is not None and staged[0] == secret:
                return state  # the same deposit, delivered twice
            raise PermanentError(f"run {run_id} is {state.value}, not awaiting_deposit; nothing to deposit")
        current = ctx.vault.read_current(key.vault_mount, key.vault_path, key.vault_field)
        if current is not None and current.secret == secret:
            raise DepositRejected("that is the credential in use now; create a new one at the provider and deposit it")
        if check:
            outcome = check_at_provider(ctx, key, secret, credential_type)
            if outcome == "deprecated":
                raise DepositRejected(f"the provider answers that this {credential_type} is deprecated; "
                                      "create a credential of the current type")
            if outcome != "valid":
                raise DepositRejected(f"the provider {key.provider} rejects this credential (its check answered "
                                      f"{outcome}); make sure you copied the whole {credential_type} and that it is active")
        ctx.vault.stage_pending(run_id, secret, None)
    snap = Snapshot(run=run, key=key, old=None, new=None, mode=parse_mode(run.mode))
    with session_scope(ctx.engine) as session:
        new_id = record_new_version(session, snap, secret=secret, key_id=None, name=None, expires_at=None)
        moved = transition(session, run, RunState.issued, actor=deposited_by, new_version_id=new_id,
                   deadline_s=step_deadline_s(ctx, RunState.issued),
                   detail={"fingerprint": secret.fingerprint, "deposited_by": deposited_by,
                           "checked_at_provider": check, **(detail or {})})
        if enqueue:  # the protocol's next step for the deposited run, once this commits
            enqueue_after_commit(session, moved, enqueue_run)
    return RunState.issued


__all__ = ["DepositRejected", "check_at_provider", "deposit"]
