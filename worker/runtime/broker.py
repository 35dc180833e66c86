"""The Dramatiq broker: Redis in production (keys prefixed with ``settings.queue_namespace``), a
``StubBroker`` for unit tests and the in-process demo. ``setup_broker`` installs it as the global
broker and declares the pipeline's actors on it."""

from __future__ import annotations

from typing import Any, Optional

import dramatiq
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import CurrentMessage

from worker.providers.ratelimit import flush_all_releases
from worker.runtime import actors
from worker.runtime.message_metrics import MessageMetrics
from worker.runtime.delayed import DelayedMessageMover, DelayInRedisBroker
from worker.redis_conn import redis_client
from worker.settings import get_settings

_broker: Optional[dramatiq.Broker] = None


#: Out of a million broker commands, how many also look for dead workers' messages (Dramatiq's
#: default is 1000: with few commands a killed worker's messages waited minutes). The look is one
#: sorted-set range query when nobody died.
MAINTENANCE_CHANCE = 100_000
DEFAULT_HEARTBEAT_TIMEOUT_S = 15.0


class FetchOnlyWhatThreadsRun(dramatiq.Middleware):
    """Each worker fetches at most one message per thread (Dramatiq's default is two): a message
    fetched but not started is lost with the worker when it is killed, until its heartbeat lapses."""

    def before_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        worker.queue_prefetch = worker.worker_threads


class FlushRateReleases(dramatiq.Middleware):
    """A stopping worker sends the rate limiter's deferred releases (worker/providers/ratelimit.py),
    so its last requests' slots end when they did rather than when their hold runs out."""

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        flush_all_releases()


def make_redis_broker(url: str, namespace: str, *, heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S) -> dramatiq.Broker:
    # Bounded socket waits: a hung Redis must surface as an error (retried, then reported) rather
    # than freeze a worker thread or the CLI forever. Dramatiq's consumer polls with Lua scripts and
    # never blocks on a socket read, so 30 s is far above any healthy answer.
    # Delayed messages (retire after grace, polls, retries) wait in Redis until due
    # (worker/runtime/delayed.py). What a killed worker held (the messages it was working on) goes
    # back to live workers once its heartbeat (every broker command, at least every second while it
    # runs) is older than ``heartbeat_timeout_s`` and a maintenance pass runs, instead of waiting
    # for the reconciler.
    # The client is built here (not from ``url=``, where Dramatiq drops the socket options) so a
    # ``redis+sentinel://`` URL works too: after a failover it reconnects to the promoted master.
    client = redis_client(url, socket_timeout=30, socket_connect_timeout=5, health_check_interval=30)
    broker = DelayInRedisBroker(client=client, namespace=namespace,
                                heartbeat_timeout=int(heartbeat_timeout_s * 1000),
                                maintenance_chance=MAINTENANCE_CHANCE)
    broker.add_middleware(DelayedMessageMover())
    broker.add_middleware(FetchOnlyWhatThreadsRun())
    broker.add_middleware(FlushRateReleases())
    return broker


def make_stub_broker() -> StubBroker:
    return StubBroker()


def setup_broker(settings: Any = None, *, broker: Optional[dramatiq.Broker] = None) -> dramatiq.Broker:
    """Install ``broker`` (default: Redis from settings) globally and declare the actors on it."""
    global _broker
    if broker is None:
        settings = settings or get_settings()
        broker = make_redis_broker(settings.redis_url, settings.queue_namespace,
                                   heartbeat_timeout_s=settings.broker_heartbeat_timeout_s)
    if not any(isinstance(m, CurrentMessage) for m in broker.middleware):
        broker.add_middleware(CurrentMessage())
    # Imported at set-up, not at the top: keyrotor_build_info in every process that has a broker,
    # and only there.
    import worker.ops_metrics  # noqa: F401
    if not any(isinstance(m, MessageMetrics) for m in broker.middleware):
        broker.add_middleware(MessageMetrics())
    dramatiq.set_broker(broker)
    _broker = broker
    actors.declare_actors(broker)
    return broker


def get_broker() -> dramatiq.Broker:
    """The installed broker; set up from settings on first use."""
    return _broker if _broker is not None else setup_broker()


def reset_broker() -> None:
    """Forget the installed broker (tests)."""
    global _broker
    _broker = None
