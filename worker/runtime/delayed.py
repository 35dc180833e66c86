"""Delayed messages held in Redis until they are due, not in a worker's memory.

Dramatiq's Redis broker puts a delayed message (a retry's backoff, an activation poll, retire
after grace) on the queue's delay queue ``<queue>.DQ``; a worker fetches up to a thousand of them
per thread and holds them in memory, unacknowledged, until each is due. When that worker is
SIGKILLed, every message it held waits for its heartbeat to time out and a maintenance pass to
requeue it: under frequent kills that wait dominated rotation time (the chaos soak, docs/chaos.md).

Here a delayed message stays in Redis until due: a sorted set ``<ns>:<queue>.delayed`` (member: the
message's Redis id, score: when it is due, in epoch milliseconds) and a hash
``<ns>:<queue>.delayed.msgs`` (id -> envelope). Every worker process runs a mover thread that
moves the due ones onto the queue itself in one Lua script (atomic: a message is either still
delayed or ready, never lost or doubled by a kill). A killed worker then loses only the handful of
messages it was working on, which come back after its heartbeat times out.

The mover looks when the earliest delayed message it knows of is due: the script answers the
earliest one left, and the process's own delayed sends tell it theirs (``after_enqueue``). Without
such news it looks once a second (``MOVE_INTERVAL_S``), which bounds how late a message delayed by
another process can be moved when that process's own mover is gone (a killed worker, the CLI).

A delay queue ``<queue>.DQ`` then holds only what an older release delayed there, so a worker
looks at it once a second (``worker/runtime/looks.py``). A ready queue is looked at when its bell
rings (``worker/runtime/bell.py``): ``enqueue``, ``enqueue_many`` and the move ring it.

The move writes the queue as Dramatiq's own ``enqueue`` command does (``HSET <queue>.msgs id
envelope`` + ``RPUSH <queue> id``); tests/integration/test_delayed_messages.py proves a real
Dramatiq worker consumes what it moved, so a change of that layout fails the suite.
"""

from __future__ import annotations

import random
import threading
from typing import Any, Optional
from uuid import uuid4

import dramatiq
from dramatiq.broker import Consumer
from dramatiq.common import current_millis, dq_name, q_name
from dramatiq.message import Message

from worker import log
from worker.queues import bell_channel, delayed_keys
from worker.runtime.bell import Bell, ring
from worker.runtime.poison import PoisonSafeRedisBroker
from worker.runtime.looks import SparseLooks, maintaining

logger = log.get_logger("keyrotor.pipeline.delayed")

#: Seconds between two looks for due messages when none is known to be due sooner (±20 % jitter so
#: workers spread their looks): the lateness of a message whose sender has no mover running.
MOVE_INTERVAL_S = 1.0
#: Seconds before the first look again after a failed one (doubling with each failure, at most 50×).
MOVE_RETRY_S = 0.1
#: At most this many messages per queue move in one script call (the next look takes the rest).
MOVE_BATCH = 200

#: Seconds between two looks of a worker at an empty delay queue.
DELAY_QUEUE_LOOK_S = 1.0
#: Seconds between two looks of a worker at an empty queue with a bell (worker/runtime/bell.py): how
#: long a message whose ring was lost can wait.
UNRUNG_LOOK_S = 1.0

# KEYS: per queue, four keys: its delayed set, its delayed envelopes, its list, its envelopes.
# ARGV: now (epoch ms), batch size (per queue), then per queue its bell's channel (rung when any of
# its messages moved). Returns how many moved in all, and when the earliest message still delayed is
# due (epoch ms; -1 when none is).
_MOVE_DUE = """
local moved = 0
local earliest = -1
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
    if #due > 0 then
        redis.call("publish", ARGV[3 + q], #due)
    end
    local next_due = redis.call("zrange", delayed, 0, 0, "WITHSCORES")[2]
    if next_due and (earliest < 0 or tonumber(next_due) < earliest) then
        earliest = tonumber(next_due)
    end
end
return {moved, earliest}
"""


class DelayInRedisBroker(PoisonSafeRedisBroker):
    """The Redis broker whose delayed messages wait in Redis (see the module's docstring)."""

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Consumer:
        """A queue's consumer looks when the queue's bell rings, and every ``UNRUNG_LOOK_S`` while
        the queue stays empty. A delay queue has no bell (only an older release wrote it): it is
        looked at every ``DELAY_QUEUE_LOOK_S``."""
        consumer = super().consume(queue_name, prefetch, timeout)
        if queue_name == dq_name(queue_name):
            return SparseLooks(consumer, interval_s=DELAY_QUEUE_LOOK_S, idle_sleep_s=timeout / 1000)
        return SparseLooks(consumer, interval_s=UNRUNG_LOOK_S, idle_sleep_s=timeout / 1000,
                           bell=Bell(self.client, bell_channel(self.namespace, queue_name)))

    def _should_do_maintenance(self, command: str) -> int:
        return 1 if maintaining() else int(super()._should_do_maintenance(command))

    def enqueue(self, message: Message, *, delay: Optional[int] = None) -> Message:
        if not delay:
            message = super().enqueue(message)
            ring(self.client, bell_channel(self.namespace, message.queue_name))
            return message
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
        layout the mover writes too), all or none (MULTI/EXEC), with one ring of each queue's bell."""
        sent = []
        bells = set()
        pipe = self.client.pipeline(transaction=True)
        for message in messages:
            queue_name = q_name(message.queue_name)
            redis_message_id = str(uuid4())
            message = message.copy(queue_name=queue_name, options={"redis_message_id": redis_message_id})
            self.emit_before("enqueue", message, None)
            ready = f"{self.namespace}:{queue_name}"
            pipe.hset(f"{ready}.msgs", redis_message_id, message.encode())
            pipe.rpush(ready, redis_message_id)
            bells.add(bell_channel(self.namespace, queue_name))
            sent.append(message)
        for channel in sorted(bells):
            pipe.publish(channel, b"")
        pipe.execute()
        for message in sent:
            self.emit_after("enqueue", message, None)
        return sent

    def move_due(self, now_ms: Optional[int] = None, batch: int = MOVE_BATCH) -> int:
        """Move every due delayed message of the declared queues onto its queue, in one script call
        for all of them; how many moved."""
        return self.move_due_and_look_ahead(now_ms, batch)[0]

    def move_due_and_look_ahead(self, now_ms: Optional[int] = None, batch: int = MOVE_BATCH) -> tuple[int, Optional[int]]:
        """``move_due``, and when the earliest message still delayed is due (epoch ms), ``None``
        when none is. It may be due already: at most ``batch`` move per queue in one call."""
        now_ms = current_millis() if now_ms is None else now_ms
        keys: list[str] = []
        bells: list[str] = []
        for queue_name in sorted({q_name(name) for name in self.get_declared_queues()}):
            delayed, envelopes = delayed_keys(self.namespace, queue_name)
            ready = f"{self.namespace}:{queue_name}"
            keys += [delayed, envelopes, ready, f"{ready}.msgs"]
            bells.append(bell_channel(self.namespace, queue_name))
        if not keys:
            return 0, None
        moved, earliest = self._move_script(keys=keys, args=[now_ms, batch, *bells])
        return int(moved), (int(earliest) if int(earliest) >= 0 else None)

    @property
    def _move_script(self) -> Any:
        script = getattr(self, "_registered_move_script", None)
        if script is None:
            script = self._registered_move_script = self.client.register_script(_MOVE_DUE)
        return script


class DelayedMessageMover(dramatiq.Middleware):
    """Runs ``DelayInRedisBroker.move_due`` on a thread of every worker process, when the earliest
    delayed message it knows of is due, and at least every ``interval_s``."""

    def __init__(self, interval_s: float = MOVE_INTERVAL_S) -> None:
        self._interval_s = interval_s
        self._stopping = False
        self._news = threading.Condition()
        self._sent_due_ms: Optional[int] = None  # the earliest due time this process sent since the last look
        self._thread: Optional[threading.Thread] = None

    def after_enqueue(self, broker: dramatiq.Broker, message: Message, delay: Optional[int]) -> None:
        if not delay:
            return
        due_ms = current_millis() + int(delay)
        with self._news:
            if self._sent_due_ms is None or due_ms < self._sent_due_ms:
                self._sent_due_ms = due_ms
                self._news.notify()

    def after_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        if not isinstance(broker, DelayInRedisBroker):
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, args=(broker,), name="keyrotor-delayed-mover",
                                        daemon=True)
        self._thread.start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        with self._news:
            self._stopping = True
            self._news.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self, broker: DelayInRedisBroker) -> None:
        failures = 0
        while True:
            with self._news:
                self._sent_due_ms = None  # the look below sees what was sent before it
            next_due_ms: Optional[int] = None
            try:
                _moved, next_due_ms = broker.move_due_and_look_ahead()
                failures = 0
            except Exception as exc:  # Redis down or failing over: log once per outage, keep trying
                if failures == 0:
                    logger.warning("delayed_messages.move_failed", error=type(exc).__name__,
                                   action="retrying; delayed messages stay in Redis until moved")
                failures += 1
            if failures:
                look_at_ms = current_millis() + MOVE_RETRY_S * 1000 * random.uniform(0.8, 1.2) * min(2 ** failures, 50)
            else:
                look_at_ms = current_millis() + self._interval_s * 1000 * random.uniform(0.8, 1.2)
                if next_due_ms is not None:
                    look_at_ms = min(look_at_ms, next_due_ms)
            if not self._wait_until(look_at_ms, retrying=failures > 0):
                return

    def _wait_until(self, look_at_ms: float, *, retrying: bool) -> bool:
        """Wait until ``look_at_ms``, or until a message this process sent is due sooner (not while
        Redis is failing: its backoff holds); ``False`` once the worker stops."""
        with self._news:
            while not self._stopping:
                due_ms = look_at_ms
                if self._sent_due_ms is not None and not retrying:
                    due_ms = min(due_ms, self._sent_due_ms)
                wait_s = (due_ms - current_millis()) / 1000
                if wait_s <= 0:
                    return True
                self._news.wait(wait_s)
            return False
