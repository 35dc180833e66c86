"""Undecodable envelopes on the real Redis queue: dead-lettered once, never echoed, and the worker
keeps consuming (it used to log a CRITICAL DecodeError, restart the consumer, and meet the same
message again after every restart)."""

from __future__ import annotations

import io
import json
import threading
import time

import dramatiq
import pytest
from dramatiq import Worker

from worker import log as klog
from worker.runtime.broker import make_redis_broker
from worker.queues import STEP_QUEUE

pytestmark = pytest.mark.integration

GARBAGE = b"\x00not-json Bearer poison0payload0abcdef {{{"
WRONG_SHAPE = json.dumps({"payload_marker": "poison-shape-marker-123"}).encode()


def test_poison_envelopes_are_dead_lettered_once_and_consumption_goes_on(redis_url: str, redis_namespace: str,
                                                                        redis_client) -> None:  # type: ignore[no-untyped-def]
    stream = io.StringIO()
    klog.configure_logging("INFO", "json", stream=stream)
    broker = make_redis_broker(redis_url, redis_namespace)
    done: list[int] = []
    seen = threading.Event()

    def collect(n: int) -> None:
        done.append(n)
        if len(done) == 3:
            seen.set()

    actor = dramatiq.actor(collect, actor_name="collect", queue_name=STEP_QUEUE, broker=broker)
    # As Dramatiq's Redis layout holds a message: its id in the queue list, its envelope in <queue>.msgs.
    queue, msgs = f"{redis_namespace}:{STEP_QUEUE}", f"{redis_namespace}:{STEP_QUEUE}.msgs"
    actor.send(1)
    for message_id, envelope in (("poison-1", GARBAGE), ("poison-2", WRONG_SHAPE)):
        redis_client.hset(msgs, message_id, envelope)
        redis_client.rpush(queue, message_id)
    actor.send(2)
    actor.send(3)
    worker = Worker(broker, queues={STEP_QUEUE}, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        assert seen.wait(30), f"valid messages not consumed: {done}\n{stream.getvalue()[-2000:]}"
        time.sleep(1.5)  # a restarted consumer would have met the poison again by now
    finally:
        worker.stop()
        broker.close()
    assert sorted(done) == [1, 2, 3]
    dead = {m.decode() for m in redis_client.zrange(f"{redis_namespace}:{STEP_QUEUE}.XQ", 0, -1)}
    assert dead == {"poison-1", "poison-2"}
    assert redis_client.hget(f"{redis_namespace}:{STEP_QUEUE}.XQ.msgs", "poison-1") == GARBAGE  # kept for inspection
    assert not redis_client.hexists(msgs, "poison-1") and not redis_client.hexists(msgs, "poison-2")
    assert not redis_client.lrange(queue, 0, -1)

    text = stream.getvalue()
    entries = [json.loads(line) for line in text.splitlines() if line.strip()]
    for marker in ("poison0payload0abcdef", "not-json", "payload_marker", "poison-shape-marker-123"):
        assert marker not in text
    assert not [e for e in entries if e["level"] == "critical"], text[-2000:]
    lettered = [e for e in entries if e["event"] == "queue_message.dead_lettered"]
    assert sorted(e["redis_message_id"] for e in lettered) == ["poison-1", "poison-2"]  # once each
    reasons = {e["redis_message_id"]: e["reason"] for e in lettered}
    assert reasons["poison-1"].startswith("not UTF-8 text") or reasons["poison-1"].startswith("not JSON")
    assert reasons["poison-2"] == "not a Dramatiq message envelope (KeyError)" or reasons["poison-2"].startswith(
        "not a Dramatiq message envelope")
