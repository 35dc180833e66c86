"""How often a worker looks at a queue while it is empty.

Dramatiq's Redis consumer looks at an empty queue every 50–100 ms (its backoff, up to the worker's
timeout), one Lua script call each: most of what an idle worker cost (figure 5 of `make bench`,
docs/performance.md). ``SparseLooks`` looks at an empty queue at most every ``interval_s``; a look
that finds work keeps looking until the queue is empty again, so a burst is taken at Dramatiq's
pace. With a ``bell`` (``worker/runtime/bell.py``: senders ring it when a message is ready), it
looks as soon as the bell rings, so a message another process sends waits for no look; the
interval then bounds only the wait of a message whose ring was lost. While the bell cannot be
heard, it looks once per worker timeout, as Dramatiq's own consumer does.

Dramatiq requeues a dead worker's unacknowledged messages of a queue (its maintenance) only inside
that queue's own commands, and only by chance (``MAINTENANCE_CHANCE``): with a tenth of the looks,
a killed worker's messages would wait ten times longer. So each sparse look runs the maintenance
(``maintaining``, read by the broker's ``_should_do_maintenance``).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Optional

from worker.runtime.bell import Bell
from worker.runtime.wrapped_consumer import WrappedConsumer

_looking = threading.local()


def maintaining() -> bool:
    """Whether this thread is in a sparse look (its commands run the queue's maintenance)."""
    return getattr(_looking, "active", False)


class SparseLooks(WrappedConsumer):
    """Looks at its queue at most every ``interval_s`` while the queue stays empty (or when its
    ``bell`` rings), each look with the queue's maintenance. Between looks it waits at most
    ``idle_sleep_s`` at a time, as the wrapped consumer sleeps on an empty queue, so a stopping
    worker waits no longer than before."""

    def __init__(self, consumer: Any, *, interval_s: float, idle_sleep_s: float, bell: Optional[Bell] = None) -> None:
        super().__init__(consumer)
        self.interval_s = interval_s
        self.bell = bell
        self._idle_sleep_s = idle_sleep_s
        self._next_look = 0.0
        self._finished = threading.Event()  # a worker thread acknowledged (or rejected) a message

    def __next__(self) -> Any:
        dramatiq_consumer = self.wrapped
        if dramatiq_consumer.message_cache:  # fetched by the last look: handed out without a look
            return next(self._consumer)
        if self._full(dramatiq_consumer):
            self._wait_for_room()
            return None
        wait = self._next_look - time.monotonic()
        if wait > 0 and not self._rung(min(wait, self._idle_sleep_s)):
            return None
        # Subscribed before the look, so a ring sent after it is heard; rings so far are answered by it.
        listening = self.bell is None or self.bell.listening
        if self.bell is not None:
            self.bell.drain()
        # An empty look sleeps Dramatiq's backoff before it answers (growing with each empty look,
        # up to its timeout), deaf to the bell: keep that sleep at its shortest.
        dramatiq_consumer.misses = 0
        _looking.active = True
        try:
            message = next(self._consumer)
        finally:
            _looking.active = False
        if message is not None:
            self._next_look = 0.0  # found work: look again at once, until the queue is empty
        else:
            self._next_look = time.monotonic() + (self.interval_s if listening else self._idle_sleep_s)
        return message

    def _full(self, dramatiq_consumer: Any) -> bool:
        """Whether the consumer holds all it may fetch (its prefetch): nothing to look for until a
        worker thread finishes one."""
        if dramatiq_consumer.outstanding_message_count < dramatiq_consumer.prefetch:
            return False
        self._finished.clear()
        # Read again after the clear: a thread that finished before it has made room already.
        return dramatiq_consumer.outstanding_message_count >= dramatiq_consumer.prefetch

    def _wait_for_room(self) -> None:
        """Until a worker thread finishes a message (``ack``/``nack``, from that thread), at most
        ``idle_sleep_s``. Dramatiq's consumer sleeps a growing backoff here instead, up to the
        worker timeout (1 s in ``keyrotor worker``), and the freed thread waited out that sleep."""
        if self.bell is not None:
            # Answered by the look made as soon as there is room: the look that filled the
            # consumer found work, so the next one is not put off.
            self.bell.drain()
        self._finished.wait(self._idle_sleep_s)

    def ack(self, message: Any) -> None:
        try:
            self._consumer.ack(message)
        finally:
            self._finished.set()

    def nack(self, message: Any) -> None:
        try:
            self._consumer.nack(message)
        finally:
            self._finished.set()

    def _rung(self, wait_s: float) -> bool:
        if self.bell is None:
            time.sleep(wait_s)
            return False
        return self.bell.wait(wait_s)

    def requeue(self, messages: Any) -> None:
        """A stopping consumer puts back what it fetched and did not start: ring for it."""
        messages = list(messages)
        self._consumer.requeue(messages)
        if self.bell is not None and messages:
            self.bell.ring()

    def close(self) -> None:
        try:
            self._consumer.close()
        finally:
            if self.bell is not None:
                self.bell.close()
