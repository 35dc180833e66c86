"""What every step shares: the snapshot of the run it acts on, its outcome, the conditional
transition with its bookkeeping (``advance_run``), the reconciler deadline, and notifications."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Callable, Iterator, Optional, Sequence

from sqlalchemy import bindparam
from sqlalchemy import select as core_select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select

from worker import log
from worker.clock import utcnow
from worker.db.models import IntegrationRecord, KeyVersion, ManagedKey, ProviderRecord, RotationRun
from worker.db import direct
from worker.db.direct import DirectStatements, Loader
from worker.db.session import session_scope, statement_scope
from worker.db.statements import PerThread
from worker.errors import PermanentError, StateConflict, TransientError
from worker.pipeline.context import PipelineContext
from worker.pipeline.effects import read_pending, safe_error, staged_in_chain
from worker.pipeline import handoff
from worker.pipeline.lease import CLAIM_UPDATE, current_lease
from worker.pipeline.row_writes import ConditionalWrite, RowChange
from worker.pipeline.runs import RUNS, load_key, load_run, load_version, run_state, transition, transition_alone
from worker.protocol import Mode, RunState, Step, expected_state, next_step, parse_mode
from worker.protocol.states import OUTCOME_STATES, WAITING_STATES
from worker.providers.base import Provider
from worker.secret import Secret

logger = log.get_logger("keyrotor.pipeline")


@dataclass(frozen=True)
class StepOutcome:
    state: RunState              # where the run is after the step
    mode: Mode
    again_in_s: Optional[float] = None   # run this same step again after this delay (polling, grace)
    next_in_s: float = 0.0               # delay before the next step


@dataclass
class Snapshot:
    run: RotationRun
    key: ManagedKey
    old: Optional[KeyVersion]
    new: Optional[KeyVersion]
    mode: Mode
    #: The key's provider record as applied, read in the snapshot's transaction: the factory, the
    #: activation timings and the next due date use it instead of reading it again. ``None`` when
    #: the record is missing.
    provider_record: Optional[ProviderRecord] = None
    #: The previous step of this chain moved the run into the state this step acts on, moments ago
    #: (the snapshot was handed over): this step has never run for the run before, so nothing it
    #: records (a sink's delivery row) can exist yet from an earlier attempt.
    entered_in_chain: bool = False
    #: The records of the key's integrations as this chain read them (by name; issue reads them
    #: for its reference check): the integration factory finds them without a query, as the
    #: provider's record is found. Empty when this chain has not read them.
    integration_records: dict[str, IntegrationRecord] = field(default_factory=dict)
    #: The provider adapter built from ``provider_record`` by this chain's first step that called
    #: the provider (``steps/provider.provider_for``): the later steps of the chain, which read the
    #: same record, use it instead of asking the factory again. ``None`` until then.
    provider: Optional[Provider] = None

    @property
    def credential_type(self) -> str:
        return self.run.target_credential_type or self.key.credential_type


class RunMissing(TransientError):
    """The message names a run this worker cannot read: the producer's commit may still be in
    flight (or reach this database replica later), so the message is retried a few times."""


def load_snapshot(ctx: PipelineContext, run_id: str, step: Step) -> Optional[Snapshot]:
    """Load the run if it is in the state ``step`` acts on, and claim its lease (``execute`` set
    one up) before the step does anything outside the database. On the way a step usually goes,
    one statement sent without BEGIN and COMMIT on PostgreSQL: the claim (``UPDATE … RETURNING``
    the run, as a CTE) joined with the key, its provider record and the run's versions. Otherwise
    (or on SQLite) a transaction reads the run, says why it is not claimed (missing, moved on,
    leased by another execution: ``LeaseHeld``) or claims it, and reads the rest.
    Nothing of it is kept beyond this step (another worker may move the run next)."""
    lease = current_lease.get()
    handed: Optional[Snapshot] = handoff.take(run_id, step)
    if handed is not None:  # the previous step of this chain claimed and read it (worker/pipeline/handoff.py)
        log.bind(key=handed.key.name)
        if lease is not None:
            lease.taken_over()
            lease.start_renewing()
        return handed
    expected = expected_state(step)
    snap: Optional[Snapshot] = None
    if lease is not None and direct.usable(ctx.engine):  # elsewhere the transaction below claims it
        with statement_scope(ctx.engine) as connection:
            claimed = claim_and_read(connection, lease.claim_params(expected.value))
        if claimed is not None:
            lease.claimed()
            snap = Snapshot(run=claimed[0], key=claimed[1], provider_record=claimed[2], old=claimed[3], new=claimed[4],
                            mode=parse_mode(claimed[0].mode))
    if snap is None:
        with session_scope(ctx.engine) as session:
            run = load_run(session, run_id)
            if run is None:
                raise RunMissing(f"run {run_id} is not in the database (yet)")
            state = run_state(run)
            if state != expected:
                logger.info("step.skipped", reason="run is not in the state this step acts on",
                            state=state.value, expected=expected.value)
                return None
            if lease is not None:
                lease.acquire(session, state.value)
            key, record, old, new = _key_provider_versions(session, run)
            snap = Snapshot(run=run, key=key, old=old, new=new, mode=parse_mode(run.mode), provider_record=record)
    log.bind(key=snap.key.name)
    if lease is not None:
        lease.start_renewing()
    return snap


def _key_provider_versions_statement() -> Any:
    """The run's key, its provider record and its two versions."""
    old, new = aliased(KeyVersion), aliased(KeyVersion)
    return (select(ManagedKey, ProviderRecord, old, new)
            .outerjoin(ProviderRecord, col(ProviderRecord.name) == col(ManagedKey.provider))
            .outerjoin(old, col(old.id) == bindparam("old_id"))
            .outerjoin(new, col(new.id) == bindparam("new_id"))
            .where(col(ManagedKey.id) == bindparam("key_id")))


def _claim_and_read_statement() -> Any:
    """The claim and the snapshot's rows in one statement: the claimed run's, its key's, its
    provider record's and its two versions' columns, each table's in table order."""
    claimed = CLAIM_UPDATE.returning(*RUNS.c).cte("claimed")
    keys, records = ManagedKey.__table__, ProviderRecord.__table__  # type: ignore[attr-defined]
    versions = KeyVersion.__table__  # type: ignore[attr-defined]
    old, new = versions.alias("old_version"), versions.alias("new_version")
    return (core_select(*claimed.c, *keys.c, *records.c, *old.c, *new.c)
            .select_from(claimed)
            .join(keys, keys.c.id == claimed.c.key_id)
            .outerjoin(records, records.c.name == keys.c.provider)
            .outerjoin(old, old.c.id == claimed.c.old_version_id)
            .outerjoin(new, new.c.id == claimed.c.new_version_id))


# Built once per thread, not shared (worker/db/statements.py: a shared statement's first compile raced).
_KEY_PROVIDER_VERSIONS = PerThread(_key_provider_versions_statement)
#: Compiled once, shared by the threads (worker/db/direct.py).
_CLAIM_AND_READ = DirectStatements()
_SNAPSHOT_ROWS = (Loader(RotationRun), Loader(ManagedKey), Loader(ProviderRecord), Loader(KeyVersion),
                  Loader(KeyVersion))


def claim_and_read(bind: "Session | Connection", claim: dict[str, Any]) -> Optional[tuple[
        RotationRun, ManagedKey, Optional[ProviderRecord], Optional[KeyVersion], Optional[KeyVersion]]]:
    """Claim the run's lease (``Lease.claim_params``) and read the snapshot's rows in one
    statement on ``bind`` (a connection of its own, ``statement_scope``, or a session's): (run,
    key, provider record, old version, new version), ``None`` where the run has none or the
    record is not applied; ``None`` when the run was not claimed (missing, moved on,
    leased by another execution). On PostgreSQL only (a data-modifying CTE), sent directly
    (worker/db/direct.py); ``None`` elsewhere, where the caller reads in a transaction instead."""
    if not direct.usable(bind):
        return None
    statement = _CLAIM_AND_READ.get("claim_and_read", direct.dialect_of(bind), _claim_and_read_statement)
    rows = direct.execute(bind, statement, claim)
    if not rows:
        return None
    loaded, offset = [], 0
    for loader in _SNAPSHOT_ROWS:
        loaded.append(loader.load(rows[0], offset))
        offset += loader.width
    run, key, record, old, new = loaded
    return run, key, record, old, new


def _key_provider_versions(session: Session, run: RotationRun) -> tuple[
        ManagedKey, Optional[ProviderRecord], Optional[KeyVersion], Optional[KeyVersion]]:
    """The run's key, its provider record (``None`` if not applied) and the run's old and new
    versions (``None`` where it has none) in one query."""
    row = session.execute(_KEY_PROVIDER_VERSIONS.get(), {"key_id": run.key_id, "old_id": run.old_version_id,
                                                         "new_id": run.new_version_id}).first()
    if row is None:  # pragma: no cover - FK guarantees it
        raise StateConflict(f"run {run.id} refers to a missing key id {run.key_id}")
    return row[0], row[1], row[2], row[3]


_ATTACHED = "keyrotor_attached"


def attach(session: Session, snap: Snapshot) -> None:
    """Put the rows the snapshot read into ``session`` as they were read, without a query
    (``merge(load=False)``): the step's transaction then finds the key, its provider record and
    the run's versions by primary key instead of reading each again. They are as current as the
    snapshot: this execution holds the run's lease and nothing else writes a run's versions; the
    key and its provider record change only by ``config apply``, which the next step's snapshot
    sees. (A merged, unmodified object is held only weakly by the session: keep it in its info.)"""
    if _ATTACHED in session.info:
        return
    session.info[_ATTACHED] = [session.merge(row, load=False)
                               for row in (snap.key, snap.provider_record, snap.old, snap.new) if row is not None]


@contextmanager
def integration_session(ctx: PipelineContext, snap: Snapshot) -> Iterator[Session]:
    """A session for the integration factory, holding the integration records this chain read
    (``merge(load=False)``), so building or finding an integration asks the database nothing."""
    with session_scope(ctx.engine) as session:
        # Held in a local: the identity map only keeps a weak reference to a clean object.
        records = [session.merge(record, load=False) for record in snap.integration_records.values()]
        yield session
        del records


def require_staged(ctx: PipelineContext, snap: Snapshot, action: str) -> tuple[Secret, Optional[str]]:
    """The run's staged secret and provider key id, checked against the fingerprint recorded at
    issue (staging is never trusted: a staging write that timed out may land later and replace it);
    a permanent error when staging is gone or holds another secret."""
    staged = staged_in_chain(snap.run.id) or read_pending(ctx.vault, snap.run.id)
    if staged is None:
        raise PermanentError(f"the staged secret of run {snap.run.id} is missing from Vault; cannot {action} it")
    recorded = snap.new.fingerprint if snap.new is not None else None
    if recorded is None or staged[0].fingerprint != recorded:
        raise PermanentError(f"staging of run {snap.run.id} holds a secret (fingerprint {staged[0].fingerprint}) other "
                             f"than the one recorded at issue ({recorded}); refusing to {action} it")
    return staged


def step_deadline_s(ctx: PipelineContext, to: RunState, delay_s: float = 0.0) -> Optional[float]:
    """When the reconciler may re-enqueue a run that did not move (None: it waits for a person)."""
    if to in WAITING_STATES or to in OUTCOME_STATES:
        return None
    return delay_s + 2 * ctx.policy.time_limit_ms / 1000


#: A move that sets these goes through a session, where the next step finds the versions (``_following``).
_VERSION_COLUMNS = frozenset({"old_version_id", "new_version_id"})


def advance_run(ctx: PipelineContext, snap: Snapshot, to: RunState, *, detail: Optional[dict[str, Any]] = None,
                delay_s: float = 0.0, changes: Sequence[RowChange] = (), writes: Sequence[ConditionalWrite] = (),
                apply: Optional[Callable[[Session], None]] = None, **fields: Any) -> StepOutcome:
    """The step's conditional transition with its bookkeeping, in one transaction: ``changes`` to
    the rows the snapshot holds and further ``writes`` go in the transition's statement, which on
    PostgreSQL is then the whole transaction, sent on a connection in autocommit without an ORM
    session (``transition_alone``); ``apply`` (the paths that fail or roll back) changes rows
    through the ORM session first."""
    if apply is None and not _VERSION_COLUMNS & fields.keys() and direct.usable(ctx.engine):
        step, lease = _chain_lease(ctx, snap, to, delay_s)
        with statement_scope(ctx.engine) as connection:
            run = transition_alone(connection, snap.run, to, actor=ctx.actor, provider=snap.key.provider,
                                   detail=detail, deadline_s=step_deadline_s(ctx, to, delay_s), lease=lease,
                                   writes=[*changes, *writes], **fields)
        following = _following(snap, step, run) if step is not None else None
    else:
        with session_scope(ctx.engine) as session:
            if apply is not None:
                attach(session, snap)
                apply(session)
            following = move_on(ctx, session, snap, to, delay_s=delay_s, detail=detail,
                                writes=[*changes, *writes], **fields)
    for change in changes:  # committed: the snapshot's rows (the next step's too) as written
        change.applied()
    hand_over(snap, following)
    logger.info("run.transition", from_state=run_state(snap.run).value, to_state=to.value, **(detail or {}))
    return StepOutcome(state=to, mode=snap.mode, next_in_s=delay_s)


def move_on(ctx: PipelineContext, session: Session, snap: Snapshot, to: RunState, *, delay_s: float = 0.0,
            detail: Optional[dict[str, Any]] = None, writes: Sequence[ConditionalWrite] = (),
            **fields: Any) -> Optional[tuple[Step, Snapshot]]:
    """The step's conditional transition to ``to`` in ``session``. When the chain runs the next
    step right away (``worker/pipeline/handoff.py``), the same UPDATE claims that step's lease for
    the chain and returns the run, and the next step's snapshot is built from it and from the rows
    this transaction holds, without a query: the key and its provider record as the chain's first
    step read them (they change only by ``config apply``, which the next chain sees), the versions
    as this step left them. Pass the result to ``hand_over`` once the transaction committed."""
    step, lease = _chain_lease(ctx, snap, to, delay_s)
    run = transition(session, snap.run, to, actor=ctx.actor, detail=detail, deadline_s=step_deadline_s(ctx, to, delay_s),
                     refresh=False, lease=lease, writes=writes, provider=snap.key.provider, **fields)
    return _following(snap, step, run, session) if step is not None else None


def _chain_lease(ctx: PipelineContext, snap: Snapshot, to: RunState,
                 delay_s: float) -> tuple[Optional[Step], Optional[tuple[str, datetime]]]:
    """The chain's next step after a move to ``to`` and the lease the move claims for it, when the
    chain runs it right away (no delay, and the chain wants it); else ``(None, None)``."""
    following = next_step(snap.mode, to) if delay_s <= 0 else None
    owner = handoff.wanted() if following is not None and expected_state(following) == to else None
    if following is None or owner is None:
        return None, None
    return following, (owner, utcnow() + timedelta(seconds=ctx.policy.lease_ttl_s))


def _following(snap: Snapshot, step: Step, run: RotationRun, session: Optional[Session] = None) -> tuple[Step, Snapshot]:
    """The next step and its snapshot: ``run`` as the move left it, the key and its provider
    record as the snapshot holds them, and the run's versions as the snapshot read them, unless
    this step changed or added versions through ``session`` (``attach``): then found in it by
    primary key. A move without a session (``transition_alone``) changes versions only through
    its ``changes``, which reach the snapshot's objects once committed, and sets no version column."""
    read = {v.id: v for v in (snap.old, snap.new) if v is not None}
    ids = (run.old_version_id, run.new_version_id)
    if session is not None and (_ATTACHED in session.info or any(vid not in read for vid in ids if vid is not None)):
        attach(session, snap)  # found by primary key below, without a query
        old, new = load_version(session, run.old_version_id), load_version(session, run.new_version_id)
    else:
        old, new = read.get(run.old_version_id), read.get(run.new_version_id)
    return step, Snapshot(run=run, key=snap.key, old=old, new=new, mode=snap.mode,
                          provider_record=snap.provider_record, entered_in_chain=True,
                          integration_records=snap.integration_records, provider=snap.provider)


def hand_over(snap: Snapshot, following: Optional[tuple[Step, Snapshot]]) -> None:
    """After the commit of a transition that claimed the chain's next step: hand it over."""
    if following is not None:
        handoff.offer(snap.run.id, following[0], following[1])


def notify_run(ctx: PipelineContext, event: str, snap: Snapshot, detail: dict[str, Any]) -> None:
    if ctx.notify is None:
        if event in ("needs_attention", "failed", "rolled_back"):
            logger.error("run.alert", alert=event, **detail)
        return
    try:
        ctx.notify(event, key_name=snap.key.name, run_id=snap.run.id, detail=detail)
    except Exception as exc:  # a failed notification never breaks the pipeline
        logger.error("notify.failed", alert=event, error=safe_error(exc))
