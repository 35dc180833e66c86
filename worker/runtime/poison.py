"""Undecodable queue messages ("poison"): dead-lettered once, with a reason, never echoed.

Dramatiq's Redis consumer raises ``DecodeError`` from its iterator when an envelope is not a
Dramatiq message (not JSON, wrong fields). Its worker then logs CRITICAL with a traceback that can
quote the payload, restarts the consumer, and the message, still unacknowledged, comes back after
every restart. ``PoisonSafeConsumer`` wraps the broker's consumer: the bad envelope is moved to
the queue's dead-letter set (Dramatiq's ``.XQ``, kept for ``dead_message_ttl``) with one ERROR
line naming the queue, its Redis message id, its size and why it could not be read; the payload is
never logged. Consumption goes on with the next message.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from dramatiq.broker import Consumer, MessageProxy
from dramatiq.brokers.redis import RedisBroker
from dramatiq.errors import DecodeError

from worker import log
from worker.metrics import QUEUE_MESSAGES_REJECTED
from worker.runtime.wrapped_consumer import WrappedConsumer

logger = log.get_logger("keyrotor.pipeline.poison")


def decode_failure(error: BaseException) -> str:
    """Why an envelope could not be read, without a byte of its content."""
    cause: BaseException = error
    while isinstance(cause, DecodeError):  # the encoder's own DecodeError may wrap the parser's error
        inner = cause.__cause__ or getattr(cause, "error", None)
        if not isinstance(inner, BaseException):
            break
        cause = inner
    if isinstance(cause, UnicodeDecodeError):
        return f"not UTF-8 text (invalid byte at position {cause.start})"
    if isinstance(cause, json.JSONDecodeError):
        return f"not JSON ({cause.msg} at position {cause.pos})"
    return f"not a Dramatiq message envelope ({type(cause).__name__})"


class PoisonSafeConsumer(WrappedConsumer):
    """A Redis broker consumer that dead-letters undecodable envelopes instead of raising."""

    def __init__(self, broker: Any, consumer: Any, queue_name: str) -> None:
        super().__init__(consumer)
        self._broker = broker
        self._queue_name = queue_name

    def __next__(self) -> Optional[MessageProxy]:
        while True:
            try:
                return next(self._consumer)
            except DecodeError as exc:
                self._dead_letter(exc)

    def _dead_letter(self, exc: DecodeError) -> None:
        data = exc.data if isinstance(exc.data, (bytes, bytearray)) else str(exc.data).encode()
        message_id = self._find_id(bytes(data))
        if message_id is not None:
            self._broker.do_nack(self._queue_name, message_id)  # moves it to <queue>.XQ, out of the acks
        QUEUE_MESSAGES_REJECTED.labels(reason="undecodable").inc()
        logger.error("queue_message.dead_lettered", queue=self._queue_name, redis_message_id=message_id,
                     size_bytes=len(data), reason=decode_failure(exc),
                     action="moved to the dead-letter queue" if message_id else "left unacknowledged (id not found)")

    def _find_id(self, data: bytes) -> Optional[str]:
        """The Redis id of a fetched envelope: the fetch returns only contents, so look it up among
        this consumer's fetched-but-unacknowledged ids (a handful: at most the prefetch)."""
        broker = self._broker
        acks = f"{broker.namespace}:__acks__.{broker.broker_id}.{self._queue_name}"
        messages = f"{broker.namespace}:{self._queue_name}.msgs"
        ids = sorted(broker.client.smembers(acks))
        if not ids:
            return None
        for message_id, stored in zip(ids, broker.client.hmget(messages, ids)):
            if stored == data:
                return message_id.decode() if isinstance(message_id, bytes) else str(message_id)
        return None


class PoisonSafeRedisBroker(RedisBroker):
    """Dramatiq's Redis broker whose consumers dead-letter undecodable envelopes."""

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Consumer:
        return PoisonSafeConsumer(self, super().consume(queue_name, prefetch, timeout), queue_name)
