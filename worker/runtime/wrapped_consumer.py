"""The base of keyrotor's wrappers around a broker's consumer: a wrapper changes what it must
(``__next__``, usually) and hands everything else to the consumer it wraps."""

from __future__ import annotations

from typing import Any, Optional

from dramatiq.broker import Consumer, MessageProxy


class WrappedConsumer(Consumer):
    """A consumer that delegates to ``consumer``; subclasses override what they change."""

    def __init__(self, consumer: Any) -> None:
        self._consumer = consumer

    def __next__(self) -> Optional[MessageProxy]:
        return next(self._consumer)

    def ack(self, message: Any) -> None:
        self._consumer.ack(message)

    def nack(self, message: Any) -> None:
        self._consumer.nack(message)

    def requeue(self, messages: Any) -> None:
        self._consumer.requeue(messages)

    def close(self) -> None:
        self._consumer.close()

    @property
    def wrapped(self) -> Any:
        """The broker's own consumer, under every wrapper."""
        inner = self._consumer
        return inner.wrapped if isinstance(inner, WrappedConsumer) else inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)
