"""Hand-offs between the steps of a chain (``worker/runtime/chains.py``): a step whose transition
leads straight to the chain's next step claims that step's lease in the transition's own UPDATE
and hands it the next step's snapshot (``steps.common.move_on``), so the next step starts without
a transaction of its own.

Without it every step of a chain opened two transactions: its snapshot (claim the lease, read the
run, its key and versions) and its transition. The transition already holds the run's row and
knows the state it leaves the run in: it sets the lease for the next step instead of clearing it
and returns the run (``RETURNING``); the key, its provider record and the versions are the ones the
chain already holds. That saves a BEGIN, a COMMIT, a pool checkout, the claim and the snapshot's
query per step.

What it changes is only who holds the lease between two steps: the chain, under the owner every
step of the chain uses (``chain_owner``), instead of nobody for the moment between the transition's
commit and the next claim. A chain that ends with a hand-off it did not use (an error after the
commit, the message's time budget spent) releases it on the way out; a worker killed in between
stops renewing, so the lease lapses within its ttl exactly as one killed inside a step does.
Outside a chain (the inline driver, a redelivered single step) nothing is handed off.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from sqlalchemy.engine import Engine

from worker import log
from worker.pipeline.lease import new_owner, release
from worker.protocol import Step

logger = log.get_logger("keyrotor.pipeline.handoff")


@dataclass
class _Chain:
    owner: str
    #: May the chain run one more step after the one running now? (its step count and time budget)
    may_continue: Callable[[], bool] = lambda: True
    #: (run id, next step, its snapshot), claimed by the last transition and not yet taken
    pending: Optional[tuple[str, Step, Any]] = None


_local = threading.local()


def _chain() -> Optional[_Chain]:
    return getattr(_local, "chain", None)


@contextmanager
def chain_handoffs(engine: Engine, actor: str) -> Iterator[None]:
    """The steps run in this block form one chain: one lease owner, hand-offs between them. On the
    way out a hand-off nobody took is released (its lease would otherwise block the run for a ttl)."""
    chain = _Chain(owner=new_owner(actor))
    _local.chain = chain
    try:
        yield
    finally:
        _local.chain = None
        if chain.pending is not None:
            run_id, step, _snap = chain.pending
            try:
                release(engine, run_id, chain.owner)
            except Exception as exc:  # it lapses within its ttl anyway
                logger.warning("handoff.release_failed", run_id=run_id, step=step.value, error=type(exc).__name__)


def set_continuation(may_continue: Callable[[], bool]) -> None:
    """Tell the chain's transitions whether the chain will run a next step without a wait."""
    chain = _chain()
    if chain is not None:
        chain.may_continue = may_continue


def chain_owner() -> Optional[str]:
    """The lease owner of every step of this chain (``None`` outside a chain)."""
    chain = _chain()
    return chain.owner if chain is not None else None


def wanted() -> Optional[str]:
    """The owner to claim the next step for, when the transition being written should hand off:
    inside a chain that will run its next step, and not holding an untaken hand-off already."""
    chain = _chain()
    if chain is None or chain.pending is not None or not chain.may_continue():
        return None
    return chain.owner


def offer(run_id: str, step: Step, snapshot: Any) -> None:
    """The transition claimed ``step`` of ``run_id`` for this chain (call after its commit)."""
    chain = _chain()
    if chain is not None:
        chain.pending = (run_id, step, snapshot)


def pending_for(run_id: str, step: Step) -> bool:
    chain = _chain()
    return chain is not None and chain.pending is not None and chain.pending[:2] == (run_id, step)


def take(run_id: str, step: Step) -> Optional[Any]:
    """The snapshot handed to ``step`` of ``run_id``, once; ``None`` if there is none."""
    chain = _chain()
    if chain is None or chain.pending is None or chain.pending[:2] != (run_id, step):
        return None
    snapshot = chain.pending[2]
    chain.pending = None
    return snapshot
