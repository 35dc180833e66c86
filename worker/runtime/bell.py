"""A queue's doorbell: whoever makes a message ready on a queue rings it, and a worker whose queue
is empty waits for the ring instead of looking at the queue every 50–100 ms.

The bell is the Redis pub/sub channel ``<ns>:<queue>.bell`` (``worker.queues.bell_channel``). A
sender publishes to it after the message is on the queue: ``DelayInRedisBroker.enqueue`` and
``enqueue_many``, the delayed-message mover's script for what it moved, a stopping consumer for what
it put back. Every consumer of the queue (in every worker process) is subscribed from before its
first look to its close, so a ring sent after a look that found the queue empty reaches the
consumer even while it is busy: it waits in the subscription until the consumer waits for it.

A ring is a hint, never the message. When Redis cuts the subscription (a restart, a failover), the
consumer subscribes again and then looks, so what was rung meanwhile is found. A message whose
sender does not ring (an older release, a producer outside Python) waits for the consumer's next
regular look (``worker/runtime/looks.py``). While subscribing fails (Redis down, an ACL that
forbids the channel) the consumer looks once per worker timeout, as Dramatiq's own consumer does.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import redis

from worker import log

logger = log.get_logger("keyrotor.pipeline.bell")

#: Seconds before a failed subscription is tried again.
RESUBSCRIBE_AFTER_S = 5.0


def ring(client: Any, channel: str) -> None:
    """Ring ``channel``'s bell after a message is ready. The message is on the queue already, so a
    failed ring is not the sender's failure (the consumers' regular looks find the message)."""
    try:
        client.publish(channel, b"")
    except redis.RedisError as exc:
        logger.debug("queue_bell.ring_failed", channel=channel, error=type(exc).__name__)


class Bell:
    """One consumer's subscription to a queue's bell (used by that consumer's thread only)."""

    def __init__(self, client: Any, channel: str) -> None:
        self._client = client
        self.channel = channel
        self._pubsub: Optional[Any] = None
        self._retry_at = 0.0
        self._failing = False  # since the last failed subscription (logged once per outage)

    @property
    def listening(self) -> bool:
        """Whether rings reach this consumer: subscribed, or subscribed again now after a failure."""
        if self._pubsub is None and time.monotonic() >= self._retry_at:
            self._subscribe()
        return self._pubsub is not None

    def drain(self) -> None:
        """Forget the rings so far: the look that follows answers them."""
        while self._pubsub is not None and self._read(0.0):
            pass

    def wait(self, timeout_s: float) -> bool:
        """Whether the bell rang within ``timeout_s`` (or had rung since the last ``drain``)."""
        if not self.listening:
            time.sleep(timeout_s)
            return False
        return self._read(timeout_s)

    def ring(self) -> None:
        ring(self._client, self.channel)

    def close(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                pubsub.close()
            except redis.RedisError:  # pragma: no cover - closing only drops the connection
                pass

    def _subscribe(self) -> None:
        pubsub = self._client.pubsub()
        try:
            pubsub.subscribe(self.channel)
            # Subscribed once Redis confirms it: a ring published before that would be missed.
            deadline = time.monotonic() + 5.0
            while True:
                reply = pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
                if reply is not None and reply.get("type") == "subscribe":
                    break
                if time.monotonic() >= deadline:
                    raise redis.TimeoutError("no confirmation of the subscription")
        except redis.RedisError as exc:
            pubsub.close()
            self._failed(exc)
            return
        self._pubsub = pubsub
        if self._failing:
            self._failing = False
            logger.info("queue_bell.listening", channel=self.channel)

    def _read(self, timeout_s: float) -> bool:
        try:
            reply = self._pubsub.get_message(timeout=timeout_s)  # type: ignore[union-attr]
        except redis.RedisError:
            # The connection was cut (a restart, a failover): subscribe again before the look that
            # follows (``listening``), and look now, since rings may have been lost. Only a failed
            # subscription is logged and waits before the next attempt.
            self.close()
            self._retry_at = 0.0
            return True
        return reply is not None and reply.get("type") == "message"

    def _failed(self, exc: BaseException) -> None:
        self._retry_at = time.monotonic() + RESUBSCRIBE_AFTER_S
        if self._failing:
            return
        self._failing = True
        logger.warning("queue_bell.unavailable", channel=self.channel, error=type(exc).__name__,
                       action=f"looking at the queue once per worker timeout; subscribing again in {RESUBSCRIBE_AFTER_S:.0f}s")
