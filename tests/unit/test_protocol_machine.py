"""The rotation state machine, exhaustively: every (mode, from, to) pair, every failure point."""

from __future__ import annotations

import itertools

import pytest

from worker.protocol.states import TERMINAL_STATES
from worker.protocol import (
    FailureKind,
    InvalidTransition,
    Mode,
    RunState,
    Step,
    can_transition,
    check_transition,
    expected_state,
    failure_target,
    happy_path,
    has_grace_period,
    next_step,
    success_target,
)

S = RunState
BEFORE = [S.requested, S.issued, S.prechecked]
AFTER = [S.promoted, S.propagated]


@pytest.mark.parametrize("mode", list(Mode))
def test_happy_path_is_allowed_step_by_step(mode: Mode) -> None:
    path = happy_path(mode)
    assert path[0] == S.requested and path[-1] == S.completed
    for a, b in zip(path, path[1:]):
        assert can_transition(mode, a, b)
        assert success_target(mode, a) == b
        step = next_step(mode, a)
        if a == S.awaiting_deposit:  # a person moves it on (`keyrotor deposit`)
            assert step is None
            continue
        assert step is not None and expected_state(step) == a


def test_assisted_waits_for_deposit() -> None:
    assert next_step(Mode.assisted, S.requested) == Step.request_deposit
    assert next_step(Mode.assisted, S.awaiting_deposit) is None
    assert S.awaiting_deposit not in happy_path(Mode.overlap)
    assert not can_transition(Mode.overlap, S.requested, S.awaiting_deposit)


@pytest.mark.parametrize("mode", [Mode.overlap, Mode.assisted])
@pytest.mark.parametrize("state", BEFORE)
def test_failure_before_promotion(mode: Mode, state: RunState) -> None:
    assert failure_target(mode, state, FailureKind.permanent) == S.compensating
    assert failure_target(mode, state, FailureKind.exhausted) == S.needs_attention


@pytest.mark.parametrize("mode", [Mode.overlap, Mode.assisted])
@pytest.mark.parametrize("state", AFTER)
@pytest.mark.parametrize("kind", list(FailureKind))
def test_failure_after_promotion_rolls_back(mode: Mode, state: RunState, kind: FailureKind) -> None:
    assert failure_target(mode, state, kind) == S.rolling_back


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("state", [S.verified, S.retired, S.compensating, S.rolling_back])
@pytest.mark.parametrize("kind", list(FailureKind))
def test_late_or_cleanup_failures_need_attention(mode: Mode, state: RunState, kind: FailureKind) -> None:
    """After verification the old key may be half-revoked: rolling back could cause an outage."""
    assert failure_target(mode, state, kind) == S.needs_attention


@pytest.mark.parametrize("state", [S.issued, S.prechecked, S.promoted, S.propagated, S.verified, S.retired])
@pytest.mark.parametrize("kind", list(FailureKind))
def test_cutover_never_compensates_or_rolls_back_after_issue(state: RunState, kind: FailureKind) -> None:
    assert failure_target(Mode.cutover, state, kind) == S.needs_attention
    assert not can_transition(Mode.cutover, state, S.rolling_back)
    assert not can_transition(Mode.cutover, state, S.compensating)


def test_cutover_issue_failure_is_clean() -> None:
    assert failure_target(Mode.cutover, S.requested, FailureKind.permanent) == S.compensating
    assert failure_target(Mode.cutover, S.requested, FailureKind.exhausted) == S.needs_attention


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("state", sorted(TERMINAL_STATES | {S.needs_attention}, key=lambda s: s.value))
def test_no_step_acts_on_terminal_or_attention(mode: Mode, state: RunState) -> None:
    assert next_step(mode, state) is None
    with pytest.raises(InvalidTransition):
        failure_target(mode, state, FailureKind.permanent)


@pytest.mark.parametrize("mode", list(Mode))
def test_terminal_states_are_final(mode: Mode) -> None:
    for terminal, other in itertools.product(TERMINAL_STATES, RunState):
        assert not can_transition(mode, terminal, other)
        with pytest.raises(InvalidTransition):
            check_transition(mode, terminal, other)


@pytest.mark.parametrize("mode", list(Mode))
def test_every_pair_is_decided_and_the_old_key_path_is_guarded(mode: Mode) -> None:
    allowed = {(a, b) for a, b in itertools.product(RunState, RunState) if can_transition(mode, a, b)}
    # Nothing skips verification on its way to retirement (invariant 2).
    assert {(a, b) for a, b in allowed if b == S.retired} == {(S.verified, S.retired), (S.needs_attention, S.retired)}
    assert {(a, b) for a, b in allowed if b == S.verified} <= {(S.propagated, S.verified), (S.needs_attention, S.verified)}
    # Only compensation ends in failed (besides a person giving up); only rollback ends in rolled_back.
    assert {a for a, b in allowed if b == S.rolled_back} <= {S.rolling_back}
    assert {a for a, b in allowed if b == S.failed} == {S.compensating, S.needs_attention}
    assert {a for a, b in allowed if b == S.completed} == {S.retired}
    for a, b in allowed:
        assert a not in TERMINAL_STATES and a != b


@pytest.mark.parametrize("mode", list(Mode))
def test_compensation_can_escalate_to_rollback_except_cutover(mode: Mode) -> None:
    assert can_transition(mode, S.compensating, S.rolling_back) == (mode != Mode.cutover)


def test_grace_period() -> None:
    assert has_grace_period(Mode.overlap, emergency=False)
    assert not has_grace_period(Mode.overlap, emergency=True)
    assert not has_grace_period(Mode.cutover, emergency=False)
    assert has_grace_period(Mode.assisted, emergency=False)


def test_unknown_mode_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown rotation mode"):
        next_step("sometimes", S.requested)
