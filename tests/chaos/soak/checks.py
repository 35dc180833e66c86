"""What the chaos run checks afterwards, from the outside: the audit chains, the accounting of
every provider key, and the leak scan."""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Mapping

import sqlalchemy as sa

from worker.protocol.states import TERMINAL_STATES
from worker.protocol import RunState, can_transition
from worker.secret import fingerprint

TERMINAL_VALUES = tuple(sorted(str(getattr(s, "value", s)) for s in TERMINAL_STATES))


def open_run_keys(conn: sa.Connection) -> list[int]:
    """key ids of the runs not in a terminal state (one per open run)."""
    return [r[0] for r in conn.execute(sa.text(
        "SELECT key_id FROM rotation_run WHERE state NOT IN :done").bindparams(
        sa.bindparam("done", expanding=True)), {"done": list(TERMINAL_VALUES)})]


def two_open_runs(conn: sa.Connection) -> list[str]:
    """Keys with more than one open run at this instant (invariant: at most one)."""
    seen: dict[int, int] = defaultdict(int)
    for key_id in open_run_keys(conn):
        seen[key_id] += 1
    return [f"key {key_id} has {n} open runs" for key_id, n in seen.items() if n > 1]


def audit_chain_violations(conn: sa.Connection) -> list[str]:
    """Every run's ``state_changed`` events, in id order, must start at ``requested``, chain
    (each ``from`` the previous ``to``), take only transitions the protocol's table allows for the
    run's mode, never go back in time, and end in the run's recorded state."""
    runs = {r.id: (r.state, r.mode) for r in conn.execute(sa.text("SELECT id, state, mode FROM rotation_run"))}
    events: dict[str, list[sa.Row]] = defaultdict(list)
    for row in conn.execute(sa.text(
            "SELECT id, run_id, at, from_state, to_state FROM audit_event "
            "WHERE event = 'state_changed' AND run_id IS NOT NULL ORDER BY id")):
        events[row.run_id].append(row)
    problems = []
    for run_id, (state, mode) in runs.items():
        chain = events.get(run_id, [])
        if not chain or chain[0].from_state is not None or chain[0].to_state != RunState.requested.value:
            problems.append(f"run {run_id}: chain does not start with -> requested")
            continue
        for before, after in zip(chain, chain[1:]):
            if after.from_state != before.to_state:
                problems.append(f"run {run_id}: {after.from_state} -> {after.to_state} follows -> {before.to_state}")
            elif not can_transition(mode, RunState(after.from_state), RunState(after.to_state)):
                problems.append(f"run {run_id}: {after.from_state} -> {after.to_state} is not allowed in {mode}")
            if after.at < before.at:
                problems.append(f"run {run_id}: event {after.id} at {after.at} is before event {before.id}")
        if chain[-1].to_state != state:
            problems.append(f"run {run_id}: audit ends in {chain[-1].to_state}, the run is {state}")
    return problems


def served_versions(conn: sa.Connection) -> dict[int, str | None]:
    """key id → provider key id of its ``current`` version in the database."""
    return {r.key_id: r.provider_key_id for r in conn.execute(sa.text(
        "SELECT key_id, provider_key_id FROM key_version WHERE stage = 'current'"))}


def held_in_flight(conn: sa.Connection) -> set[str]:
    """Provider key ids that an open run still holds (previous in grace, pending)."""
    return {r[0] for r in conn.execute(sa.text(
        "SELECT v.provider_key_id FROM key_version v JOIN rotation_run r ON r.id = v.run_id "
        "WHERE v.stage IN ('previous', 'pending') AND r.state NOT IN :done AND v.provider_key_id IS NOT NULL"
    ).bindparams(sa.bindparam("done", expanding=True)), {"done": list(TERMINAL_VALUES)})} | {r[0] for r in conn.execute(sa.text(
        "SELECT v.provider_key_id FROM key_version v JOIN rotation_run r ON r.old_version_id = v.id "
        "WHERE r.state NOT IN :done AND v.provider_key_id IS NOT NULL").bindparams(
        sa.bindparam("done", expanding=True)), {"done": list(TERMINAL_VALUES)})}


def find_leaks(secrets: Mapping[str, str], blobs: Mapping[str, bytes]) -> list[str]:
    """Where any secret appears (``"<label> <fingerprint> in <where>"``); empty: nowhere."""
    found = []
    needles = [(label, value, value.encode()) for label, value in secrets.items() if value]
    for where, blob in blobs.items():
        for label, value, needle in needles:
            if needle in blob:
                found.append(f"{label} {fingerprint(value)} in {where}")
    return found


def quantile(values: Iterable[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]
