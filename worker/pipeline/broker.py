"""The Dramatiq broker: Redis in production (keys prefixed with ``settings.queue_namespace``), a
``StubBroker`` for unit tests and the in-process demo. ``setup_broker`` installs it as the global
broker and declares the pipeline's actors on it."""

from __future__ import annotations

from typing import Any, Optional

import dramatiq
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import CurrentMessage

#: The queue of protocol steps (messages carry only ``{"run_id": …}`` as their single argument).
STEP_QUEUE = "rotation"
#: The queue of versioned rotation-request messages from any producer (see docs/queue-message.md).
REQUEST_QUEUE = "rotation_requests"

_broker: Optional[dramatiq.Broker] = None


def make_redis_broker(url: str, namespace: str) -> dramatiq.Broker:
    from worker.pipeline.poison import PoisonSafeRedisBroker

    # Bounded socket waits: a hung Redis must surface as an error (retried, then reported) rather
    # than freeze a worker thread or the CLI forever. Dramatiq's consumer polls with Lua scripts and
    # never blocks on a socket read, so 30 s is far above any healthy answer.
    return PoisonSafeRedisBroker(url=url, namespace=namespace, socket_connect_timeout=5, socket_timeout=30,
                                 health_check_interval=30)


def make_stub_broker() -> StubBroker:
    return StubBroker()


def setup_broker(settings: Any = None, *, broker: Optional[dramatiq.Broker] = None) -> dramatiq.Broker:
    """Install ``broker`` (default: Redis from settings) globally and declare the actors on it."""
    global _broker
    if broker is None:
        from worker.settings import get_settings

        settings = settings or get_settings()
        broker = make_redis_broker(settings.redis_url, settings.queue_namespace)
    if not any(isinstance(m, CurrentMessage) for m in broker.middleware):
        broker.add_middleware(CurrentMessage())
    import worker.ops_metrics  # noqa: F401  (keyrotor_build_info in every process that has a broker)
    from worker.pipeline.message_metrics import MessageMetrics

    if not any(isinstance(m, MessageMetrics) for m in broker.middleware):
        broker.add_middleware(MessageMetrics())
    dramatiq.set_broker(broker)
    _broker = broker
    from worker.pipeline import actors

    actors.declare_actors(broker)
    return broker


def get_broker() -> dramatiq.Broker:
    """The installed broker; set up from settings on first use."""
    return _broker if _broker is not None else setup_broker()


def reset_broker() -> None:
    """Forget the installed broker (tests)."""
    global _broker
    _broker = None
