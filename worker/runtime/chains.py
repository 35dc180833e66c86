"""Steps that need no wait run back to back in one message (a *chain*), so a rotation whose key is
live at once and whose grace is 0 costs one queue message instead of seven.

Each step of a chain is still its own execution: its own snapshot, lease and conditional
transition, as if it had come in its own message, except that the transition of one claims the
next in the same UPDATE and hands it its snapshot (``worker/pipeline/handoff.py``). What changes
is what a killed worker leaves behind. Without chains, the unacknowledged message is the step that
was running, and it is redelivered once the worker's heartbeat lapses. With chains, the unacknowledged message is the
chain's *first* step, which the run has left behind: redelivered, it would be skipped as a late
duplicate and the run would wait for the reconciler (minutes). So before a worker runs a second
step inside a message it marks the message in Redis (``<namespace>:chain:<message id>``), and a
delivery of a marked message that finds the run moved on continues from the run's current state.
Only a redelivery carries a mark (the id is the message's own), so a genuine duplicate or a late
message is still dropped, and two chains never drive one run at the same time (the lease guards
that in any case).
"""

from __future__ import annotations

import threading
from typing import Any, Optional

import dramatiq

from worker import log

logger = log.get_logger("keyrotor.pipeline.chains")

#: At most this many steps after the first run inside one message (a rotation has at most eight).
MAX_FUSED_STEPS = 12
#: A chain stops fusing once it has used this share of the step time limit (Dramatiq's TimeLimit
#: counts per message): the rest of the limit is left for the step it is in.
TIME_LIMIT_SHARE = 0.25


class ChainMarks:
    """Marks of messages whose delivery fused steps: Redis keys on a Redis broker (every worker
    sees them), a set in memory on a StubBroker (one process: tests, the demo)."""

    def __init__(self, broker: dramatiq.Broker) -> None:
        self._client: Any = getattr(broker, "client", None)
        self._prefix = f"{getattr(broker, 'namespace', 'dramatiq')}:chain:"
        self._local: set[str] = set()
        self._lock = threading.Lock()

    def mark(self, message_id: str, ttl_s: float) -> None:
        if self._client is None:
            with self._lock:
                self._local.add(message_id)
            return
        self._client.set(self._prefix + message_id, b"1", px=max(1000, int(ttl_s * 1000)))

    def marked(self, message_id: str) -> bool:
        if self._client is None:
            with self._lock:
                return message_id in self._local
        return bool(self._client.exists(self._prefix + message_id))

    def clear(self, message_id: str) -> None:
        """Best effort: the mark expires on its own, and a stale one only lets a redelivery of this
        same message continue the run (the lease and the state checks make that safe)."""
        try:
            if self._client is None:
                with self._lock:
                    self._local.discard(message_id)
                return
            self._client.delete(self._prefix + message_id)
        except Exception as exc:
            logger.warning("chain.unmark_failed", error=type(exc).__name__)


_marks: Optional[ChainMarks] = None
_marks_broker: Optional[int] = None


def chain_marks(broker: dramatiq.Broker) -> ChainMarks:
    """The marks for ``broker`` (one per installed broker)."""
    global _marks, _marks_broker
    if _marks is None or _marks_broker != id(broker):
        _marks, _marks_broker = ChainMarks(broker), id(broker)
    return _marks
