"""Delayed messages held in Redis until they are due, not in a worker's memory.

Dramatiq's Redis broker puts a delayed message (a retry's backoff, an activation poll, retire
after grace) on the queue's delay queue ``<queue>.DQ``; a worker fetches up to a thousand of them
per thread and holds them in memory, unacknowledged, until each is due. When that worker is
SIGKILLed, every message it held waits for its heartbeat to time out and a maintenance pass to
requeue it: under frequent kills that wait dominated rotation time (the chaos soak, docs/chaos.md).

Here a delayed message stays in Redis until due: a sorted set ``<ns>:<queue>.delayed`` (member: the
message's Redis id, score: when it is due, in epoch milliseconds) and a hash
``<ns>:<queue>.delayed.msgs`` (id -> envelope). Every worker process runs a mover thread that, a
few times a second, moves the due ones onto the queue itself in one Lua script (atomic: a message
is either still delayed or ready, never lost or doubled by a kill). A killed worker then loses
only the handful of messages it was working on, which come back after its heartbeat times out.

A delay queue ``<queue>.DQ`` then holds only what an older release delayed there, so its consumer
(``DelayQueueDrain``) looks for such leftovers once a second instead of every 100 ms; Dramatiq runs
its dead-worker maintenance for a queue only inside that queue's own commands, by chance (one in
ten here), so each of these looks runs it: a killed worker's delay-queue messages come back as
soon as before, for a tenth of the looks.

The move writes the queue as Dramatiq's own ``enqueue`` command does (``HSET <queue>.msgs id
envelope`` + ``RPUSH <queue> id``); tests/integration/test_delayed_messages.py proves a real
Dramatiq worker consumes what it moved, so a change of that layout fails the suite.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any, Optional
from uuid import uuid4

import dramatiq
from dramatiq.broker import Consumer
from dramatiq.common import current_millis, dq_name, q_name
from dramatiq.message import Message

from worker import log
from worker.queues import delayed_keys
from worker.runtime.poison import PoisonSafeRedisBroker
from worker.runtime.wrapped_consumer import WrappedConsumer

logger = log.get_logger("keyrotor.pipeline.delayed")

#: Seconds between two looks for due messages (with ±20 % jitter so workers spread their looks):
#: the lateness a delayed message can have on top of its delay.
MOVE_INTERVAL_S = 0.1
#: At most this many messages per queue move in one script call (the next look takes the rest).
MOVE_BATCH = 200

#: Seconds between two looks of a worker at a delay queue (``DelayQueueDrain``).
DELAY_QUEUE_LOOK_S = 1.0

# KEYS: per queue, four keys: its delayed set, its delayed envelopes, its list, its envelopes.
# ARGV: now (epoch ms), batch size (per queue). Returns how many moved in all.
_MOVE_DUE = """
local moved = 0
for q = 0, #KEYS / 4 - 1 do
    local delayed, envelopes, ready, ready_envelopes = KEYS[q * 4 + 1], KEYS[q * 4 + 2], KEYS[q * 4 + 3], KEYS[q * 4 + 4]
    local due = redis.call("zrangebyscore", delayed, "-inf", ARGV[1], "LIMIT", 0, tonumber(ARGV[2]))
    for _, message_id in ipairs(due) do
        local envelope = redis.call("hget", envelopes, message_id)
        if envelope then
            redis.call("hset", ready_envelopes, message_id, envelope)
            redis.call("rpush", ready, message_id)
            redis.call("hdel", envelopes, message_id)
        end
        redis.call("zrem", delayed, message_id)
    end
    moved = moved + #due
end
return moved
"""


#: Set on a thread while its delay-queue consumer looks: the look runs the queue's maintenance.
_looking = threading.local()


class DelayQueueDrain(WrappedConsumer):
    """The consumer of a delay queue: it looks at most every ``DELAY_QUEUE_LOOK_S``, and each look
    runs Dramatiq's dead-worker maintenance for the queue. Between looks it sleeps as the wrapped
    consumer sleeps on an empty queue (at most ``idle_sleep_s``), so a stopping worker waits no
    longer than before. Leftovers it fetches are handled by Dramatiq as ever (enqueued when due)."""

    def __init__(self, consumer: Any, *, idle_sleep_s: float) -> None:
        super().__init__(consumer)
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
            self._next_look = time.monotonic() + DELAY_QUEUE_LOOK_S
        return message


class DelayInRedisBroker(PoisonSafeRedisBroker):
    """The Redis broker whose delayed messages wait in Redis (see the module's docstring)."""

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Consumer:
        consumer = super().consume(queue_name, prefetch, timeout)
        if queue_name != dq_name(queue_name):
            return consumer
        return DelayQueueDrain(consumer, idle_sleep_s=timeout / 1000)

    def _should_do_maintenance(self, command: str) -> int:
        if getattr(_looking, "active", False):
            return 1
        return int(super()._should_do_maintenance(command))

    def enqueue(self, message: Message, *, delay: Optional[int] = None) -> Message:
        if not delay:
            return super().enqueue(message)
        queue_name = q_name(message.queue_name)  # a retry of a message fetched from a .DQ
        options = {key: value for key, value in message.options.items() if key != "eta"}
        due_ms = current_millis() + int(delay)
        # A fresh Redis id for every enqueue, as Dramatiq does (a retried message keeps its id).
        redis_message_id = str(uuid4())
        message = message.copy(queue_name=queue_name, options={**options, "redis_message_id": redis_message_id})
        self.emit_before("enqueue", message, delay)
        delayed, envelopes = delayed_keys(self.namespace, queue_name)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(envelopes, redis_message_id, message.encode())
        pipe.zadd(delayed, {redis_message_id: due_ms})
        pipe.execute()
        self.emit_after("enqueue", message, delay)
        return message

    def enqueue_many(self, messages: list[Message]) -> list[Message]:
        """Enqueue ready (not delayed) messages in one round trip, written as Dramatiq's own
        ``enqueue`` writes them (``HSET <queue>.msgs id envelope`` + ``RPUSH <queue> id``, the
        layout the mover writes too), all or none (MULTI/EXEC)."""
        sent = []
        pipe = self.client.pipeline(transaction=True)
        for message in messages:
            queue_name = q_name(message.queue_name)
            redis_message_id = str(uuid4())
            message = message.copy(queue_name=queue_name, options={"redis_message_id": redis_message_id})
            self.emit_before("enqueue", message, None)
            ready = f"{self.namespace}:{queue_name}"
            pipe.hset(f"{ready}.msgs", redis_message_id, message.encode())
            pipe.rpush(ready, redis_message_id)
            sent.append(message)
        pipe.execute()
        for message in sent:
            self.emit_after("enqueue", message, None)
        return sent

    def move_due(self, now_ms: Optional[int] = None, batch: int = MOVE_BATCH) -> int:
        """Move every due delayed message of the declared queues onto its queue, in one script call
        for all of them; how many moved."""
        now_ms = current_millis() if now_ms is None else now_ms
        keys: list[str] = []
        for queue_name in sorted({q_name(name) for name in self.get_declared_queues()}):
            delayed, envelopes = delayed_keys(self.namespace, queue_name)
            ready = f"{self.namespace}:{queue_name}"
            keys += [delayed, envelopes, ready, f"{ready}.msgs"]
        if not keys:
            return 0
        return int(self._move_script(keys=keys, args=[now_ms, batch]))

    @property
    def _move_script(self) -> Any:
        script = getattr(self, "_registered_move_script", None)
        if script is None:
            script = self._registered_move_script = self.client.register_script(_MOVE_DUE)
        return script


class DelayedMessageMover(dramatiq.Middleware):
    """Runs ``DelayInRedisBroker.move_due`` on a thread of every worker process."""

    def __init__(self, interval_s: float = MOVE_INTERVAL_S) -> None:
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def after_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        if not isinstance(broker, DelayInRedisBroker):
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(broker,), name="keyrotor-delayed-mover",
                                        daemon=True)
        self._thread.start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self, broker: DelayInRedisBroker) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                broker.move_due()
                failures = 0
            except Exception as exc:  # Redis down or failing over: log once per outage, keep trying
                if failures == 0:
                    logger.warning("delayed_messages.move_failed", error=type(exc).__name__,
                                   action="retrying; delayed messages stay in Redis until moved")
                failures += 1
            pause = self._interval_s * random.uniform(0.8, 1.2) * min(2 ** failures, 50)
            self._stop.wait(pause)
