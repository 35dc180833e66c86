"""A person resolves a run that ``needs_attention`` (``keyrotor resolve RUN --action A``).

The run stopped because retries ran out or a clean-up step failed; the old key is untouched and
an alert went out. After fixing the cause, the operator picks one way out:

- ``retry``      back to the state the run stopped in, attempts reset, its step enqueued;
- ``compensate`` (stopped before promotion) revoke the new key and end ``failed``;
- ``rollback``   (stopped after promotion, old key not yet revoked) restore the old key in Vault,
                 re-push it, revoke the new key, end ``rolled_back``;
- ``cancel``     end the run (also a run ``awaiting_deposit``: nothing was issued by keyrotor; a
                 value staged by an interrupted deposit is discarded). Only where no issued
                 credential can be left behind: with nothing
                 issued it ends ``cancelled`` at once; with a new key issued but not promoted it
                 compensates first (the run then ends ``failed``, with the cancel in its audit
                 trail); once Vault serves the new key (or in a cutover, where the new key is the
                 only valid one) it is refused — use ``retry`` or ``rollback``.

- ``revoked-by-person`` (stopped retiring: the old key could not be revoked, e.g. its provider key
                 id was never known) a person revoked the old key at the provider; it is recorded
                 as revoked by them and the run completes (retired → completed).

Every choice is checked against the protocol's state machine and written to the audit trail with
the operator as actor. The step message is sent only after the caller's transaction commits, so
a worker never sees the run in its old state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from sqlmodel import col, select, Session

from worker.db.models import AuditEvent, KeyVersion, RotationRun, VersionStage
from worker.protocol.states import BEFORE_PROMOTION_STATES, PROMOTED_STATES, RunState
from worker.errors import PermanentError
from worker.pipeline.context import default_policy, get_context
from worker.pipeline.outbox import enqueue_after_commit, enqueue_run
from worker.pipeline.runs import load_run, load_version, run_state, transition
from worker.protocol import Mode, can_transition, next_step, parse_mode
from worker import log
from worker.clock import utcnow
from worker.pipeline.effects import read_pending
from worker.vault.secret_store import SecretStore

S = RunState
Action = Literal["retry", "compensate", "rollback", "cancel", "revoked-by-person"]
ACTIONS: tuple[Action, ...] = ("retry", "compensate", "rollback", "cancel", "revoked-by-person")
REVOKED_BY_PERSON: Action = "revoked-by-person"

_BEFORE_PROMOTION = BEFORE_PROMOTION_STATES | {S.compensating}  # stopped before promotion, or cleaning up after it
_AFTER_PROMOTION = PROMOTED_STATES | {S.rolling_back}


class ResolveRefused(PermanentError):
    """The action is not allowed for this run; the message says why and which actions are."""


@dataclass(frozen=True)
class _Options:
    stopped_in: Optional[RunState]
    targets: dict[str, RunState]        # action → state the run moves to
    refusals: dict[str, str]            # action → why not


def _stopped_in(session: Session, run: RotationRun) -> Optional[RunState]:
    """The state the run was in when it was sent to needs_attention (from the audit trail)."""
    event = session.exec(
        select(AuditEvent).where(AuditEvent.run_id == run.id, AuditEvent.event == "state_changed",
                                 AuditEvent.to_state == S.needs_attention.value)
        .order_by(col(AuditEvent.id).desc())
    ).first()
    if event is None or not event.from_state:
        return None
    try:
        return RunState(event.from_state)
    except ValueError:
        return None


def _has_new_credential(session: Session, run: RotationRun, vault: SecretStore | None) -> bool:
    """Was a credential issued (recorded, or staged by an attempt that crashed before recording)?"""
    if run.new_version_id is not None:
        return True
    if vault is None:
        vault = get_context().vault

    return read_pending(vault, run.id) is not None


def _options(session: Session, run: RotationRun, vault: SecretStore | None) -> _Options:
    mode = parse_mode(run.mode)
    stopped = _stopped_in(session, run)
    targets: dict[str, RunState] = {}
    refusals: dict[str, str] = {}
    old: Optional[KeyVersion] = load_version(session, run.old_version_id)

    if stopped is None:
        refusals["retry"] = "the audit trail does not say which state the run stopped in"
    elif stopped == S.awaiting_deposit or next_step(mode, stopped) is None or not can_transition(mode, S.needs_attention, stopped):
        refusals["retry"] = f"there is no step to retry in {stopped.value}"
    else:
        targets["retry"] = stopped

    if stopped in _AFTER_PROMOTION or stopped == S.retired:
        refusals["compensate"] = "Vault already serves the new key; compensating would revoke the key in use (use rollback)"
    elif mode == Mode.cutover and run.new_version_id is not None:
        refusals["compensate"] = "cutover: the new key is the only valid one and must not be revoked"
    else:
        targets["compensate"] = S.compensating

    if mode == Mode.cutover:
        refusals["rollback"] = "cutover: issuing invalidated the old key, there is nothing to roll back to"
    elif stopped not in _AFTER_PROMOTION:
        refusals["rollback"] = ("the old key was already revoked" if stopped == S.retired
                                else "the new key was never promoted in Vault (use compensate)")
    elif old is None or old.vault_version is None:
        refusals["rollback"] = "there is no previous Vault version to restore (first rotation of this key)"
    elif old.stage == VersionStage.retired.value:
        refusals["rollback"] = "the old key was already revoked at the provider; restoring it would break consumers"
    else:
        targets["rollback"] = S.rolling_back

    if stopped in _AFTER_PROMOTION or stopped == S.retired:
        refusals["cancel"] = "Vault serves the new key; cancelling would leave the rotation half done (use retry or rollback)"
    elif stopped == S.rolling_back:
        refusals["cancel"] = "a rollback is under way; cancelling would leave the new key served (use retry)"
    elif stopped == S.compensating or _has_new_credential(session, run, vault):
        if mode == Mode.cutover:
            refusals["cancel"] = "cutover: the new key is the only valid one; cancelling would orphan it (use retry)"
        else:
            targets["cancel"] = S.compensating  # revoke the issued key first; the run then ends failed
    else:
        targets["cancel"] = S.cancelled

    if stopped != S.verified:
        refusals[REVOKED_BY_PERSON] = "only a run that stopped retiring the old key (verified) can record it as revoked by a person"
    elif mode == Mode.cutover:
        refusals[REVOKED_BY_PERSON] = "cutover: issuing the new key already invalidated the old one (use retry)"
    else:
        targets[REVOKED_BY_PERSON] = S.retired

    for action, target in list(targets.items()):  # the state machine has the last word
        if not can_transition(mode, S.needs_attention, target):
            del targets[action]
            refusals[action] = f"the {mode.value} protocol does not allow needs_attention → {target.value}"
    return _Options(stopped, targets, refusals)


def resolution_options(session: Session, run: RotationRun, vault: SecretStore | None = None) -> dict[str, RunState]:
    """action → the state it would move ``run`` to: a run that needs attention, or ``cancel`` for a
    run awaiting a deposit ({} for any other run)."""
    state = run_state(run)
    if state == S.awaiting_deposit:
        return {"cancel": S.cancelled}
    if state != S.needs_attention:
        return {}
    return dict(_options(session, run, vault).targets)


def stopped_in(session: Session, run: RotationRun) -> Optional[RunState]:
    """The state a run that needs attention stopped in (from its audit trail), if known."""
    return _stopped_in(session, run)


def allowed_actions(session: Session, run_id: str, *, vault: SecretStore | None = None) -> dict[str, str]:
    """action → the state it would move the run to, for a run that needs attention or awaits a
    deposit ({} otherwise)."""
    run = load_run(session, run_id)
    if run is None:
        return {}
    return {action: state.value for action, state in resolution_options(session, run, vault).items()}


def discard_deposit(run: RotationRun, vault: SecretStore | None) -> None:
    """Drop a value an interrupted ``keyrotor deposit`` may have staged for ``run`` (idempotent).
    Best effort: it is a person-made credential kept in Vault's staging area, so an unreachable
    Vault must not stop a cancel (a breach takeover least of all); it is logged instead."""
    try:
        if vault is None:
            vault = get_context().vault
        vault.discard_pending(run.id)
    except Exception as exc:  # noqa: BLE001

        log.get_logger("keyrotor.pipeline.resolve").warning(
            "deposit.discard_failed", run_id=run.id, error=type(exc).__name__,
            detail="a value staged for this run may remain in Vault's staging area; delete it by hand")


def resolve_run(session: Session, run_id: str, action: str, actor: str, *, note: Optional[str] = None,
                vault: SecretStore | None = None, enqueue: bool = True) -> RotationRun:
    """Resolve a ``needs_attention`` run with ``action`` (``retry`` | ``compensate`` | ``rollback`` |
    ``cancel`` | ``revoked-by-person``) on behalf of ``actor`` (a person: ``"user:alice"``); returns the updated run.

    Validates against the state machine and the run's history, moves the run with a conditional
    update (attempts reset, ``last_error`` cleared on retry), writes the ``state_changed`` audit
    event with ``actor`` and ``detail.resolution``, and — once ``session`` commits — enqueues the
    step for the new state. The caller commits; a one-liner for the CLI::

        with session_scope(engine) as s: run = resolve_run(s, run_id, action, actor=f"user:{me}")

    Raises ``ResolveRefused`` (a ``PermanentError``) naming the allowed actions when the action
    is not allowed, and ``StateConflict`` if someone moved the run meanwhile. ``vault`` (default:
    the pipeline context's) is only read to look for a staged key of a run that recorded none.
    """
    if action not in ACTIONS:
        raise ResolveRefused(f"unknown action {action!r}; choose one of: {', '.join(ACTIONS)}")
    run = load_run(session, run_id)
    if run is None:
        raise ResolveRefused(f"no run {run_id!r}; list runs with `keyrotor runs`")
    state = run_state(run)
    if state == S.awaiting_deposit:
        if action != "cancel":
            raise ResolveRefused(f"run {run_id} is awaiting a deposit; the only action is cancel "
                                 f"(or deposit the new value with `keyrotor deposit {run_id}`)")
        discard_deposit(run, vault)
        detail: dict[str, Any] = {"resolution": "cancel", "previous_error": run.last_error, **({"note": note[:500]} if note else {})}
        return transition(session, run, S.cancelled, actor=actor, detail=detail, deadline_s=None)
    if state != S.needs_attention:
        raise ResolveRefused(f"run {run_id} is {state.value}, not needs_attention; only runs that need attention "
                             "(or await a deposit: cancel) can be resolved")
    options = _options(session, run, vault)
    target = options.targets.get(action)
    if target is None:
        allowed = ", ".join(f"{a} (→ {s.value})" for a, s in options.targets.items()) or "none (investigate by hand)"
        raise ResolveRefused(f"cannot {action} run {run_id} (stopped in "
                             f"{options.stopped_in.value if options.stopped_in else 'an unknown state'}): "
                             f"{options.refusals.get(action, 'not allowed')}. Allowed: {allowed}")
    detail = {"resolution": action, "stopped_in": options.stopped_in.value if options.stopped_in else None,
                              "previous_error": run.last_error}
    if note:
        detail["note"] = note[:500]
    if action == "cancel" and target == S.compensating:
        detail["compensating_first"] = "a new key was issued; it is revoked before the run ends"
    fields: dict[str, Any] = {"attempts": 0}
    if action in ("retry", REVOKED_BY_PERSON):
        fields["last_error"] = None
    if action == REVOKED_BY_PERSON:
        detail["revocation"] = "revoked_by_person"
        _retire_old_version(session, run)
    policy = default_policy()
    deadline = None if target in (S.cancelled,) else 2 * policy.time_limit_ms / 1000
    moved = transition(session, run, target, actor=actor, detail=detail, deadline_s=deadline, **fields)
    if enqueue and next_step(moved.mode, target) is not None:
        enqueue_after_commit(session, moved, enqueue_run)
    return moved


def _retire_old_version(session: Session, run: RotationRun) -> None:
    """The old key is recorded as revoked (by the person resolving), as ``retire`` would have."""
    old = load_version(session, run.old_version_id)
    if old is not None and old.stage != VersionStage.retired.value:
        old.stage, old.retired_at = VersionStage.retired, utcnow()
        session.add(old)
