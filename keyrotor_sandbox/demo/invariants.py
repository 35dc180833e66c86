"""The checks `keyrotor demo` ends with: the design's invariants, observed from outside.

Each check looks at the real state of the world — what Vault serves, what the provider stand-in
accepts, what the consumer saw, what the database and the logs contain — rather than trusting
the pipeline's own account of itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from sqlalchemy.engine import Engine
from sqlmodel import col, select

from worker.clock import as_utc
from worker.db.models import AuditEvent, KeyVersion, ManagedKey, RotationRun, VersionStage
from worker.protocol.states import RunState
from worker.db.session import read_files_safely, session_scope


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def _stage(value: Any) -> str:
    return value.value if hasattr(value, "value") else str(value)


def vault_serves_working_keys(engine: Engine, read_current: Callable[[ManagedKey], Any],
                              is_live: Callable[[str], bool]) -> Check:
    """Invariant 1: what Vault serves at every key's path authenticates at the provider."""
    bad = []
    with session_scope(engine) as session:
        keys = session.exec(select(ManagedKey).order_by(col(ManagedKey.name))).all()
    for key in keys:
        stored = read_current(key)
        if stored is None:
            bad.append(f"{key.name}: nothing at {key.vault_mount}/{key.vault_path}")
        elif not is_live(stored.secret.reveal()):
            bad.append(f"{key.name}: Vault serves {stored.secret.fingerprint}, which the provider rejects")
    return Check("vault serves a working key for every key", not bad and bool(keys),
                 "; ".join(bad) or f"{len(keys)} keys checked at the provider")


def retired_only_after_verification_and_grace(engine: Engine, key_state: Callable[[str], str]) -> Check:
    """Invariant 2: an old key is revoked only after the run verified and its grace period ended."""
    bad, seen = [], 0
    with session_scope(engine) as session:
        runs = session.exec(select(RotationRun).where(RotationRun.state == RunState.completed.value)).all()
        for run in runs:
            seen += 1
            events = session.exec(select(AuditEvent).where(AuditEvent.run_id == run.id).order_by(col(AuditEvent.id))).all()
            order = [e.to_state for e in events if e.to_state]
            if "verified" not in order or "retired" not in order or order.index("verified") > order.index("retired"):
                bad.append(f"run {run.id}: retired without a prior verified step ({' → '.join(order)})")
                continue
            verified_at = next(as_utc(e.at) for e in events if e.to_state == "verified")
            retired_at = next(as_utc(e.at) for e in events if e.to_state == "retired")
            grace_until = as_utc(run.grace_until)
            if grace_until is None or retired_at is None or verified_at is None or retired_at < grace_until:
                bad.append(f"run {run.id}: retired at {retired_at} before the grace period ended ({grace_until})")
            old = session.get(KeyVersion, run.old_version_id) if run.old_version_id else None
            if old is None:
                bad.append(f"run {run.id}: no record of the credential it replaced")
            elif old.provider_key_id and key_state(old.provider_key_id) != "revoked":
                bad.append(f"run {run.id}: old key {old.provider_key_id} is still {key_state(old.provider_key_id)} at the provider")
    return Check("old keys revoked only after verification + grace", not bad and seen > 0,
                 "; ".join(bad) or f"{seen} completed runs: verified → grace → retired, old keys rejected")


def rollback_kept_old_key(engine: Engine, run_id: str | None, key_state: Callable[[str], str],
                          read_current: Callable[[ManagedKey], Any]) -> Check:
    """The rolled-back key: old credential still works and is served again; the new one is revoked."""
    name = "rolled-back key: old credential works, new one revoked"
    if run_id is None:
        return Check(name, False, "no run was rolled back")
    with session_scope(engine) as session:
        run = session.get(RotationRun, run_id)
        if run is None or _stage(run.state) != RunState.rolled_back.value:
            return Check(name, False, f"run {run_id} ended {_stage(run.state) if run else 'missing'}, expected rolled_back")
        key = session.get(ManagedKey, run.key_id)
        old = session.get(KeyVersion, run.old_version_id) if run.old_version_id else None
        new = session.get(KeyVersion, run.new_version_id) if run.new_version_id else None
    problems = []
    if old is None or new is None:
        return Check(name, False, "the run does not record both its old and new credential")
    if old.provider_key_id and key_state(old.provider_key_id) != "live":
        problems.append(f"old key {old.provider_key_id} is {key_state(old.provider_key_id)}")
    if new.provider_key_id and key_state(new.provider_key_id) != "revoked":
        problems.append(f"new key {new.provider_key_id} is {key_state(new.provider_key_id)}")
    stored = read_current(key) if key is not None else None
    if stored is None or stored.secret.fingerprint != old.fingerprint:
        problems.append(f"Vault serves {stored.secret.fingerprint if stored else 'nothing'}, not the old {old.fingerprint}")
    return Check(name, not problems, "; ".join(problems) or
                 f"{key.name if key else '?'}: Vault serves {old.fingerprint} again; {new.fingerprint} revoked")


def no_orphans(engine: Engine, live_key_ids: Iterable[str]) -> Check:
    """Invariant 4: every key live at the provider is a current or in-grace credential of some key."""
    live = set(live_key_ids)
    with session_scope(engine) as session:
        known = {
            v.provider_key_id: _stage(v.stage)
            for v in session.exec(select(KeyVersion)).all() if v.provider_key_id
        }
    orphans = sorted(k for k in live if known.get(k) not in (VersionStage.current.value, VersionStage.previous.value))
    return Check("no orphan keys at the provider", not orphans,
                 f"live but not current: {', '.join(orphans)}" if orphans else f"{len(live)} live keys, all current")


def audit_trail_is_a_chain(engine: Engine, run_ids: Iterable[str]) -> Check:
    """Invariant 6: every run's state changes are recorded in order, each from where the last left."""
    bad = []
    with session_scope(engine) as session:
        for run_id in run_ids:
            events = session.exec(
                select(AuditEvent).where(AuditEvent.run_id == run_id, col(AuditEvent.to_state).is_not(None))
                .order_by(col(AuditEvent.id))).all()
            run = session.get(RotationRun, run_id)
            prev: str | None = None
            for e in events:
                if prev is not None and e.from_state and e.from_state != prev:
                    bad.append(f"run {run_id}: {e.from_state} → {e.to_state} follows {prev}")
                prev = e.to_state
            if run is None or prev != _stage(run.state):
                bad.append(f"run {run_id}: trail ends at {prev}, run is {_stage(run.state) if run else 'missing'}")
    return Check("audit trail records every state change in order", not bad, "; ".join(bad) or "unbroken chains")


def consumer_saw_no_failures(failures: int, probes: int) -> Check:
    return Check("consumer probe saw zero failures", failures == 0 and probes > 0,
                 f"{probes} probes, {failures} failures")


def no_secret_leaked(secrets: Iterable[str], blobs: dict[str, bytes]) -> Check:
    """Invariant 5: no issued secret appears in the captured logs, output or database files."""
    secrets = [s for s in secrets if s]
    hits = sorted({name for name, blob in blobs.items() for s in secrets if s.encode() in blob})
    return Check("no issued secret in logs, output or database", not hits and bool(secrets),
                 f"found in: {', '.join(hits)}" if hits else f"{len(secrets)} secrets × {len(blobs)} files scanned")


def read_blobs(paths: Iterable[Path]) -> dict[str, bytes]:
    """Bytes of every file that exists (SQLite's -wal/-shm included by the caller).

    Read in a child process: this process has SQLite connections to the database, and closing a
    file descriptor of it here would drop their POSIX locks (``read_files_safely``)."""
    paths = list(paths)
    read = read_files_safely([str(p) for p in paths])
    return {p.name: data for p in paths if (data := read[str(p)]) is not None}
