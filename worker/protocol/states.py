"""Vocabulary of the rotation protocol: run states, modes, steps, failure kinds, state sets.

The one home of every run-state set and of the rotation-mode enum: the ORM column
(``worker.db.models``), the providers and the service layer import them from here. Nothing here
does I/O and nothing here imports another keyrotor module.
"""

from __future__ import annotations

import enum


class RunState(str, enum.Enum):
    requested = "requested"
    awaiting_deposit = "awaiting_deposit"  # assisted mode: waits for the owner's deposit (Vault, or `keyrotor deposit`)
    issued = "issued"
    prechecked = "prechecked"
    promoted = "promoted"
    propagated = "propagated"
    verified = "verified"                  # in grace until grace_until
    retired = "retired"
    completed = "completed"
    compensating = "compensating"          # failure before promotion: revoke the new key
    failed = "failed"
    rolling_back = "rolling_back"          # failure after promotion: restore the old key
    rolled_back = "rolled_back"
    needs_attention = "needs_attention"    # retries exhausted; old key untouched, alert raised
    cancelled = "cancelled"


#: States in which a run is over (``finished_at`` is set and the key may rotate again).
TERMINAL_STATES = frozenset({RunState.completed, RunState.failed, RunState.rolled_back, RunState.cancelled})


class Mode(str, enum.Enum):
    """How a provider rotates: a provider's ``mode`` and a run's ``mode`` column."""

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


#: States before Vault serves the new secret (a failure here means compensating, not rolling back).
BEFORE_PROMOTION_STATES = frozenset({RunState.requested, RunState.awaiting_deposit, RunState.issued, RunState.prechecked})

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


__all__ = ["RunState", "TERMINAL_STATES", "Mode", "Step", "FailureKind", "BEFORE_PROMOTION_STATES", "PROMOTED_STATES", "WAITING_STATES",
           "OUTCOME_STATES", "parse_mode"]
