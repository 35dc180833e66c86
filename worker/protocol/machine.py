"""The rotation state machine: which transitions are allowed per mode, which step acts on a state,
and where a failure leads. Pure functions over enums, so every path can be tested exhaustively.

Failure policy (DESIGN.md):
- before promotion (requested/issued/prechecked): permanent → compensating (revoke the new key);
  retries exhausted → needs_attention (old key untouched, alert).
- after promotion (promoted/propagated): rolling_back, whether permanent or exhausted (restore the
  old key first, it is still valid; needs_attention only if the rollback itself fails).
- verified/retired: the new key is served and verified and the old one may already be revoked, so
  rolling back could cause the outage it is meant to prevent → needs_attention.
- compensating/rolling_back themselves failing → needs_attention.
- cutover: issuing has invalidated the old key, so once a key is issued there is nothing to roll
  back to and revoking the new one would leave no valid key → needs_attention.
- emergency (a breach): a failure before promotion leaves the exposed credential in service, so
  it never ends quietly ``failed``: → needs_attention (alert; a person retries, compensates or
  cancels). After promotion the old key is still restored first (no outage).
"""

from __future__ import annotations

from worker.protocol.states import (
    BEFORE_PROMOTION_STATES,
    TERMINAL_STATES,
    FailureKind,
    Mode,
    RunState,
    Step,
    parse_mode,
)

S = RunState

#: The forward path per mode.
_HAPPY_PATH: dict[Mode, tuple[RunState, ...]] = {
    Mode.overlap: (S.requested, S.issued, S.prechecked, S.promoted, S.propagated, S.verified, S.retired, S.completed),
    Mode.cutover: (S.requested, S.issued, S.prechecked, S.promoted, S.propagated, S.verified, S.retired, S.completed),
    Mode.assisted: (S.requested, S.awaiting_deposit, S.issued, S.prechecked, S.promoted, S.propagated, S.verified,
                    S.retired, S.completed),
}

_BEFORE_PROMOTION = BEFORE_PROMOTION_STATES

#: Where a person can send a run that needs attention (``keyrotor resolve``): give up, or
#: run the clean-up path, or resume where it stopped.
_RESOLUTIONS = frozenset({S.cancelled, S.failed, S.compensating, S.rolling_back})


class InvalidTransition(ValueError):
    """A step tried a transition the protocol does not allow (a bug, never a race)."""


def happy_path(mode: Mode | str) -> tuple[RunState, ...]:
    return _HAPPY_PATH[parse_mode(mode)]


def failure_target(mode: Mode | str, state: RunState, kind: FailureKind, *, emergency: bool = False) -> RunState:
    """Where a run goes when the step acting on ``state`` fails for good."""
    mode = parse_mode(mode)
    if state in TERMINAL_STATES or state == S.needs_attention:
        raise InvalidTransition(f"a run in {state.value} has no step that can fail")
    if state in (S.compensating, S.rolling_back):
        return S.needs_attention
    if emergency and state in _BEFORE_PROMOTION:
        return S.needs_attention
    if mode == Mode.cutover:
        # Only the issue call itself may fail cleanly: until it succeeded the old key is intact.
        if state == S.requested and kind == FailureKind.permanent:
            return S.compensating
        return S.needs_attention
    if state in _BEFORE_PROMOTION:
        return S.compensating if kind == FailureKind.permanent else S.needs_attention
    if state in (S.promoted, S.propagated):
        return S.rolling_back
    return S.needs_attention  # verified, retired


def allowed_transitions(mode: Mode | str) -> frozenset[tuple[RunState, RunState]]:
    """Every (from, to) pair the protocol allows in ``mode``."""
    mode = parse_mode(mode)
    path = _HAPPY_PATH[mode]
    pairs: set[tuple[RunState, RunState]] = set(zip(path, path[1:]))
    for state in path[:-1]:
        for kind in FailureKind:
            pairs.add((state, failure_target(mode, state, kind)))
    for state in (S.compensating, S.rolling_back):
        pairs.add((state, S.needs_attention))
    pairs.add((S.compensating, S.failed))
    # Compensation found Vault already serving the new key (crash between promote and record):
    # restoring the old key is the only safe way out.
    if mode != Mode.cutover:
        pairs.add((S.compensating, S.rolling_back))
        pairs.add((S.rolling_back, S.rolled_back))
    # Cancelling before anything was issued is always safe.
    pairs.add((S.requested, S.cancelled))
    if mode == Mode.assisted:
        pairs.add((S.awaiting_deposit, S.cancelled))
    for target in _RESOLUTIONS:
        if mode == Mode.cutover and target == S.rolling_back:
            continue
        pairs.add((S.needs_attention, target))
    # Resume: a person fixed the cause and sends the run back to the state it stopped in.
    for state in path[:-1]:
        if state != S.awaiting_deposit:
            pairs.add((S.needs_attention, state))
    return frozenset(pairs)


_ALLOWED = {mode: allowed_transitions(mode) for mode in Mode}


def can_transition(mode: Mode | str, from_state: RunState, to_state: RunState) -> bool:
    return (from_state, to_state) in _ALLOWED[parse_mode(mode)]


def check_transition(mode: Mode | str, from_state: RunState, to_state: RunState) -> None:
    if not can_transition(mode, from_state, to_state):
        raise InvalidTransition(
            f"rotation protocol ({parse_mode(mode).value}) does not allow {from_state.value} → {to_state.value}"
        )


_STEP_FOR_STATE: dict[RunState, Step] = {
    S.issued: Step.precheck,
    S.prechecked: Step.promote,
    S.promoted: Step.propagate,
    S.propagated: Step.verify,
    S.verified: Step.retire,
    S.retired: Step.finish,
    S.compensating: Step.compensate,
    S.rolling_back: Step.rollback,
}


def next_step(mode: Mode | str, state: RunState) -> Step | None:
    """The step that moves a run on from ``state``; ``None`` when it waits (a person, or over)."""
    mode = parse_mode(mode)
    if state == S.requested:
        return Step.request_deposit if mode == Mode.assisted else Step.issue
    return _STEP_FOR_STATE.get(state)


def expected_state(step: Step) -> RunState:
    """The one state a step acts on (anything else means a duplicate or late message)."""
    if step in (Step.issue, Step.request_deposit):
        return S.requested
    for state, candidate in _STEP_FOR_STATE.items():
        if candidate == step:
            return state
    raise InvalidTransition(f"unknown step {step!r}")  # pragma: no cover


def success_target(mode: Mode | str, state: RunState) -> RunState:
    """Where the step acting on ``state`` moves the run when it succeeds."""
    mode = parse_mode(mode)
    if state == S.compensating:
        return S.failed
    if state == S.rolling_back:
        return S.rolled_back
    path = _HAPPY_PATH[mode]
    if state not in path or state == path[-1]:
        raise InvalidTransition(f"no step moves a {mode.value} run on from {state.value}")
    return path[path.index(state) + 1]


def has_grace_period(mode: Mode | str, *, emergency: bool) -> bool:
    """Cutover has nothing to overlap; an emergency (breach) revokes the old key at once."""
    return parse_mode(mode) != Mode.cutover and not emergency
