"""How often a worker looks at a queue that rarely has work.

Dramatiq's Redis consumer looks at an empty queue every 50–100 ms (its backoff, up to the worker's
timeout), one Lua script call each: most of what an idle worker cost (figure 5 of `make bench`,
docs/performance.md). ``SparseLooks`` looks at a queue that rarely has work at most every
``interval_s`` while it stays empty; a look that finds work keeps looking until the queue is empty
again, so a burst is taken at Dramatiq's pace.

Dramatiq requeues a dead worker's unacknowledged messages of a queue (its maintenance) only inside
that queue's own commands, and only by chance (``MAINTENANCE_CHANCE``): with a tenth of the looks,
a killed worker's messages would wait ten times longer. So each sparse look runs the maintenance
(``maintaining``, read by the broker's ``_should_do_maintenance``).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from worker.runtime.wrapped_consumer import WrappedConsumer

_looking = threading.local()


def maintaining() -> bool:
    """Whether this thread is in a sparse look (its commands run the queue's maintenance)."""
    return getattr(_looking, "active", False)


class SparseLooks(WrappedConsumer):
    """Looks at its queue at most every ``interval_s`` while the queue stays empty, each look with
    the queue's maintenance. Between looks it sleeps as the wrapped consumer sleeps on an empty
    queue (at most ``idle_sleep_s`` at a time), so a stopping worker waits no longer than before."""

    def __init__(self, consumer: Any, *, interval_s: float, idle_sleep_s: float) -> None:
        super().__init__(consumer)
        self.interval_s = interval_s
        self._idle_sleep_s = idle_sleep_s
        self._next_look = 0.0

    def __next__(self) -> Any:
        wait = self._next_look - time.monotonic()
        if wait > 0:
            time.sleep(min(wait, self._idle_sleep_s))
            return None
        _looking.active = True
        try:
            message = next(self._consumer)
        finally:
            _looking.active = False
        if message is None:
            self._next_look = time.monotonic() + self.interval_s
        return message
