"""The rotation protocol as a pure state machine (no I/O): see ``machine.py``."""

from worker.protocol.machine import (
    InvalidTransition,
    allowed_transitions,
    can_transition,
    check_transition,
    expected_state,
    failure_target,
    happy_path,
    has_grace_period,
    next_step,
    success_target,
)
from worker.protocol.states import FailureKind, Mode, RunState, Step, parse_mode

__all__ = [
    "InvalidTransition", "allowed_transitions", "can_transition", "check_transition", "expected_state",
    "failure_target", "happy_path", "has_grace_period", "next_step", "success_target",
    "FailureKind", "Mode", "RunState", "Step", "parse_mode",
]
