"""Vocabulary of the rotation protocol: run states (from the DB model), modes, steps, failure kinds.

``RunState`` lives in ``worker.db.models`` so the column and the protocol share one enum; this
module only adds the words the state machine needs. Nothing here does I/O.
"""

from __future__ import annotations

import enum

from worker.db.models import TERMINAL_STATES, RunState


class Mode(str, enum.Enum):
    """How a provider rotates (mirrors ``worker.providers.base.RotationMode``)."""

    overlap = "overlap"      # old and new valid together: grace period, rollback possible
    cutover = "cutover"      # issuing invalidates the old key: no grace, no rollback
    assisted = "assisted"    # a person deposits the new value; then as overlap


class Step(str, enum.Enum):
    """One Dramatiq actor per step; each acts on exactly one run state."""

    issue = "issue"
    request_deposit = "request_deposit"
    precheck = "precheck"
    promote = "promote"
    propagate = "propagate"
    verify = "verify"
    retire = "retire"
    finish = "finish"
    compensate = "compensate"
    rollback = "rollback"


class FailureKind(str, enum.Enum):
    permanent = "permanent"  # retrying will not help: take the failure path now
    exhausted = "exhausted"  # transient errors until the retry budget ran out


#: States reached once Vault serves the new secret (a failure here means rolling back).
PROMOTED_STATES = frozenset({RunState.promoted, RunState.propagated, RunState.verified})

#: States that no step moves on by itself: over, or waiting for a person.
WAITING_STATES = frozenset({RunState.awaiting_deposit, RunState.needs_attention})

#: Outcomes counted in ``keyrotor_rotations_total``.
OUTCOME_STATES = frozenset(TERMINAL_STATES | {RunState.needs_attention})


def parse_mode(value: str | Mode | None) -> Mode:
    """The run's mode column as a ``Mode``; an unknown value is a programming/inventory error."""
    if isinstance(value, Mode):
        return value
    try:
        return Mode(value or "overlap")
    except ValueError:
        raise ValueError(f"unknown rotation mode {value!r}; expected overlap, cutover or assisted") from None


def is_terminal(state: RunState) -> bool:
    return state in TERMINAL_STATES


__all__ = ["RunState", "TERMINAL_STATES", "Mode", "Step", "FailureKind", "PROMOTED_STATES", "WAITING_STATES",
           "OUTCOME_STATES", "parse_mode", "is_terminal"]
