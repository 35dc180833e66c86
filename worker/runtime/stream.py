"""The producer interface: rotation requests as plain JSON on a Redis Stream.

Any producer (``redis-cli``, a CI job, an incident tool, any Redis client) adds one entry::

    XADD <namespace>:rotation-requests * request '{"version": 1, "key": "...", "requested_by": "..."}'

Every ``keyrotor worker`` process reads the stream through the consumer group ``keyrotor``
(``XREADGROUP``), applies each request (``messages.consume``: validate, create or join the run,
enqueue its first step) and acknowledges it (``XACK``) only afterwards. Entries a consumer read but
never acknowledged (it was killed) are claimed by a live one once idle for ``claim_idle_ms``
(``XAUTOCLAIM``). A request applied twice maps to the same run: its ``idempotency_key``, or the
entry's stream id when the producer gave none. A rejected entry (not JSON, schema violation,
unknown key, ...) is audited and logged with its reason by ``messages.reject``, copied to
``<namespace>:rotation-requests:rejected`` (stream id, reason, code; never the payload) and
acknowledged, so it never loops. An entry that keeps failing for a transient reason (database
down) is retried on each claim and rejected after ``max_deliveries``.

The schema is docs/queue-message.md; nothing here depends on Dramatiq's Redis layout.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from typing import Any, Optional, cast

import redis

from worker import log
from worker.clock import utcnow
from worker.redis_conn import redis_client
from worker.pipeline.messages import consume, reject
from worker.retry import backoff_delay

logger = log.get_logger("keyrotor.pipeline.stream")

GROUP = "keyrotor"
#: The field of a stream entry that holds the JSON request.
REQUEST_FIELD = "request"
#: Rejected entries are kept this long (approximately; ``XADD MAXLEN ~``).
DEAD_LETTER_MAXLEN = 10_000


def stream_key(namespace: str) -> str:
    """``<namespace>:rotation-requests``: where producers ``XADD`` their requests."""
    return f"{namespace}:rotation-requests"


def dead_letter_key(namespace: str) -> str:
    """``<namespace>:rotation-requests:rejected``: one entry per rejected request (no payload)."""
    return f"{stream_key(namespace)}:rejected"


def consumer_name() -> str:
    """Unique per process: the host name (the pod's) and the process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class StreamSettings:
    claim_idle_ms: int = 30_000
    block_ms: int = 2_000
    batch: int = 10
    max_deliveries: int = 10


class RequestStreamConsumer:
    """Reads, applies and acknowledges rotation requests from the stream (one per process)."""

    def __init__(self, client: redis.Redis, *, namespace: str, engine: Any, name: Optional[str] = None,
                 options: StreamSettings = StreamSettings()) -> None:
        self.client = client
        self.stream = stream_key(namespace)
        self.dead_letters = dead_letter_key(namespace)
        self.engine = engine
        self.name = name or consumer_name()
        self.options = options
        self._group_ready = False

    def ensure_group(self) -> None:
        """Create the group (and the stream) if needed, from the start of the stream: a request
        added before any worker ever ran is still applied."""
        try:
            self.client.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def poll(self, *, block_ms: Optional[int] = None) -> int:
        """One round: claim entries other consumers left idle, then read new ones (waiting up to
        ``block_ms``). Returns how many entries were handled."""
        if not self._group_ready:
            self.ensure_group()
        handled = 0
        _next, claimed, *_ = self.client.xautoclaim(self.stream, GROUP, self.name, self.options.claim_idle_ms,
                                                    start_id="0-0", count=self.options.batch)
        for entry_id, fields in claimed:
            if fields is None:  # trimmed away while pending: nothing to apply
                self.client.xack(self.stream, GROUP, entry_id)
                continue
            handled += self._handle(entry_id, fields, claimed=True)
        # redis-py types this reply loosely (any RESP value); this is the documented shape.
        answer = cast("list[tuple[Any, list[tuple[Any, dict[Any, Any]]]]] | None", self.client.xreadgroup(
            GROUP, self.name, {self.stream: ">"}, count=self.options.batch,
            block=self.options.block_ms if block_ms is None else block_ms))
        for _stream, entries in answer or []:
            for entry_id, fields in entries:
                handled += self._handle(entry_id, fields, claimed=False)
        return handled

    def _handle(self, entry_id: Any, fields: dict[Any, Any], *, claimed: bool) -> int:
        entry = _text(entry_id)
        message_id = f"stream:{entry}"
        rejected: list[tuple[str, str]] = []
        raw = fields.get(REQUEST_FIELD.encode()) if REQUEST_FIELD.encode() in fields else fields.get(REQUEST_FIELD)
        try:
            if raw is None:
                reason = f"the entry has no '{REQUEST_FIELD}' field (XADD <stream> * {REQUEST_FIELD} '<json>')"
                reject(self.engine, reason, "no_request_field", message_id)
                rejected.append((reason, "no_request_field"))
            else:
                consume(raw, engine=self.engine, message_id=message_id, default_idempotency_key=message_id,
                        on_reject=lambda reason, code: rejected.append((reason, code)))
        except Exception as exc:  # transient (database, Redis): left pending, claimed again later
            if self._deliveries(entry) < self.options.max_deliveries:
                logger.warning("request_stream.retry_later", entry=entry, error=type(exc).__name__, claimed=claimed)
                return 0
            reason = f"gave up after {self.options.max_deliveries} deliveries: {type(exc).__name__}"
            reject(self.engine, reason, "gave_up", message_id)
            rejected.append((reason, "gave_up"))
        for reason, code in rejected:
            self.client.xadd(self.dead_letters, {"entry": entry, "reason": reason, "code": code,
                                                 "at": utcnow().isoformat()},
                             maxlen=DEAD_LETTER_MAXLEN, approximate=True)
        self.client.xack(self.stream, GROUP, entry_id)
        return 1

    def _deliveries(self, entry: str) -> int:
        pending = self.client.xpending_range(self.stream, GROUP, min=entry, max=entry, count=1)
        return int(pending[0]["times_delivered"]) if pending else 0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


class StreamThread:
    """Runs a consumer in a daemon thread until ``stop()``; errors are logged and retried with a
    bounded, jittered backoff (Redis restarts must not end the worker)."""

    def __init__(self, consumer: RequestStreamConsumer) -> None:
        self.consumer = consumer
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="request-stream", daemon=True)

    def start(self) -> "StreamThread":
        self._thread.start()
        logger.info("request_stream.started", stream=self.consumer.stream, group=GROUP, consumer=self.consumer.name)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self.consumer.poll()
                failures = 0
            except Exception as exc:  # noqa: BLE001 - keep consuming once Redis/database are back
                failures += 1
                delay = backoff_delay(failures, 0.5, 30.0)
                logger.error("request_stream.poll_failed", error=type(exc).__name__, retry_in_s=round(delay, 2))
                self._stop.wait(delay)


def start_request_stream(settings: Any, engine: Any) -> StreamThread:
    """The consumer thread of one worker process, from settings."""
    client = redis_client(settings.redis_url, socket_connect_timeout=5, socket_timeout=30)
    options = StreamSettings(claim_idle_ms=int(settings.request_stream_claim_idle_s * 1000))
    return StreamThread(RequestStreamConsumer(client, namespace=settings.queue_namespace, engine=engine,
                                              options=options)).start()
