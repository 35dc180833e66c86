"""The queue as the service layer sees it: queue and actor names, and sending a message.

The actors (``worker/runtime/actors.py``, an entry point) are declared on a broker by
``worker.runtime.broker.setup_broker``, which registers them here with ``register_actors``.
Everything that enqueues (the outbox, the CLI, the stream consumer, the actors themselves) sends
through ``send_step``/``send_request``, so the service layer never imports the actors.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Optional

import dramatiq
from dramatiq.common import q_name

from worker import log
from worker.protocol import Step

#: The queue of protocol steps (messages carry only ``{"run_id": …}`` as their single argument).
STEP_QUEUE = "rotation"
#: The queue of versioned rotation-request messages from any producer (see docs/queue-message.md).
REQUEST_QUEUE = "rotation_requests"
#: The request actor's name (a producer outside Python writes it into its envelope).
REQUEST_ACTOR = "rotation_requests"

#: Dramatiq refuses delays beyond 7 days; a longer grace period is reached by re-enqueueing.
MAX_DELAY_MS = 6 * 86_400_000

_declared: dict[str, dramatiq.Actor] = {}


def delayed_keys(namespace: str, queue_name: str) -> tuple[str, str]:
    """The sorted set of due times and the hash of envelopes of ``queue_name``'s delayed messages."""
    base = f"{namespace}:{q_name(queue_name)}.delayed"
    return base, f"{base}.msgs"


def bell_channel(namespace: str, queue_name: str) -> str:
    """The pub/sub channel rung when a message is ready on ``queue_name`` (worker/runtime/bell.py)."""
    return f"{namespace}:{q_name(queue_name)}.bell"


class BrokerNotSetUp(RuntimeError):
    """A message was sent before an entry point called ``setup_broker`` (a programming error)."""


def actor_name(step: Step) -> str:
    return f"step_{step.value}"


def register_actors(actors: Mapping[str, dramatiq.Actor]) -> None:
    """The actors declared on the installed broker (``setup_broker``); replaces any earlier set."""
    _declared.clear()
    _declared.update(actors)


def clear_actors() -> None:
    _declared.clear()


def declared_actor(name: str) -> dramatiq.Actor:
    try:
        return _declared[name]
    except KeyError:
        raise BrokerNotSetUp(f"no actor {name!r} is declared: call worker.runtime.broker.setup_broker "
                             "before sending messages") from None


def send_step(step: Step, run_id: str, *, delay_ms: int = 0) -> None:
    """Enqueue ``step`` for ``run_id`` (the message carries only the run id); inside
    ``batched_sends``, a message without delay waits for the end of the block."""
    delay = min(max(0, int(delay_ms)), MAX_DELAY_MS)
    actor = declared_actor(actor_name(step))
    pending: Optional[list[dramatiq.Message[Any]]] = getattr(_batch, "messages", None)
    if pending is not None and not delay:
        pending.append(actor.message_with_options(args=(run_id,)))
        return
    actor.send_with_options(args=(run_id,), delay=delay or None)


_batch = threading.local()


@contextmanager
def batched_sends() -> Iterator[None]:
    """The step messages this thread sends in the block go to the broker together at its end, in
    one round trip where the broker can (a detection pass's hundred runs: one instead of a
    hundred). A failure to send is logged, not raised, like a single send after a commit: the
    runs are committed, and the reconciler re-enqueues a run whose message was lost."""
    if getattr(_batch, "messages", None) is not None:  # nested: the outer block sends
        yield
        return
    _batch.messages = []
    try:
        yield
    finally:
        messages, _batch.messages = _batch.messages, None
        if messages:
            _enqueue_all(messages)


def _enqueue_all(messages: list["dramatiq.Message[Any]"]) -> None:
    broker = dramatiq.get_broker()
    try:
        enqueue_many = getattr(broker, "enqueue_many", None)
        if enqueue_many is not None:
            enqueue_many(messages)
        else:
            for message in messages:
                broker.enqueue(message)
    except Exception as exc:
        log.get_logger(__name__).error("enqueue_failed", messages=len(messages), error=type(exc).__name__,
                                       detail=str(exc)[:200])


def send_request(request: dict[str, Any]) -> None:
    """Enqueue a request from Python (producers elsewhere follow docs/queue-message.md)."""
    declared_actor(REQUEST_ACTOR).send(request)
