"""Delayed messages wait in Redis until due (worker/runtime/delayed.py), on the real Redis: no
worker holds them, a real Dramatiq worker consumes what the mover moved, retries' backoffs go the
same way, and a killed worker's death costs no delayed message anything."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import dramatiq
import pytest

from worker.queues import REQUEST_QUEUE, STEP_QUEUE, delayed_keys
from worker.runtime.broker import reset_broker, setup_broker
from worker.runtime.delayed import DelayInRedisBroker
from worker.settings import load_settings

pytestmark = pytest.mark.integration


def _wait_for(predicate: Any, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


@pytest.fixture()
def live_broker(redis_url: str, redis_namespace: str) -> Any:
    settings = load_settings(redis_url=redis_url, queue_namespace=redis_namespace, broker_heartbeat_timeout_s=3)
    broker = setup_broker(settings)
    yield broker
    broker.close()
    reset_broker()


def test_a_delayed_message_waits_in_redis_not_in_a_worker(live_broker: Any, redis_namespace: str,
                                                           redis_client: Any) -> None:
    assert isinstance(live_broker, DelayInRedisBroker)
    seen: list[tuple[str, float]] = []

    def probe(run_id: str) -> None:
        seen.append((run_id, time.monotonic()))

    actor = dramatiq.actor(probe, actor_name="probe_delayed_in_redis", queue_name=STEP_QUEUE, broker=live_broker)
    sent_at = time.monotonic()
    actor.send_with_options(args=("run-1",), delay=800)

    delayed, envelopes = delayed_keys(redis_namespace, STEP_QUEUE)
    assert redis_client.zcard(delayed) == 1
    (message_id,) = redis_client.hkeys(envelopes)
    envelope = json.loads(redis_client.hget(envelopes, message_id))
    assert envelope["queue_name"] == STEP_QUEUE and "eta" not in envelope["options"]
    assert envelope["args"] == ["run-1"]
    # Nothing on Dramatiq's own delay queue, nothing ready yet.
    assert redis_client.hlen(f"{redis_namespace}:{STEP_QUEUE}.DQ.msgs") == 0
    assert redis_client.llen(f"{redis_namespace}:{STEP_QUEUE}") == 0

    worker = dramatiq.Worker(live_broker, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        time.sleep(0.4)
        assert seen == [] and redis_client.zcard(delayed) == 1, "moved before it was due"
        assert _wait_for(lambda: seen, timeout_s=10), "the due message never reached the worker"
        assert seen[0][0] == "run-1"
        assert seen[0][1] - sent_at >= 0.8
        assert redis_client.zcard(delayed) == 0 and redis_client.hlen(envelopes) == 0
    finally:
        worker.stop()


def test_a_retry_backoff_waits_in_redis_and_the_retry_runs(live_broker: Any, redis_namespace: str,
                                                            redis_client: Any) -> None:
    calls: list[int] = []
    delayed, _ = delayed_keys(redis_namespace, STEP_QUEUE)
    delayed_counts: list[int] = []

    def flaky(run_id: str) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise dramatiq.Retry("not yet", delay=500)

    dramatiq.actor(flaky, actor_name="probe_flaky", queue_name=STEP_QUEUE, broker=live_broker,
                   max_retries=3).send("run-2")
    worker = dramatiq.Worker(live_broker, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        assert _wait_for(lambda: (delayed_counts.append(redis_client.zcard(delayed)) or len(calls) >= 2), 10)
        assert max(delayed_counts) == 1, "the retry's backoff did not wait in the delayed set"
        assert redis_client.hlen(f"{redis_namespace}:{STEP_QUEUE}.DQ.msgs") == 0
    finally:
        worker.stop()


def test_delayed_messages_survive_the_death_of_every_worker(redis_url: str, redis_namespace: str,
                                                            redis_client: Any) -> None:
    """A worker that sent delayed messages dies before they are due: a worker started later gets
    every one of them on time (nothing was ever held by the dead process)."""
    settings = load_settings(redis_url=redis_url, queue_namespace=redis_namespace)
    done_key = f"{redis_namespace}:probe-done"

    def probe(run_id: str) -> None:
        redis_client.rpush(done_key, run_id)

    first = setup_broker(settings)
    sender = dramatiq.actor(probe, actor_name="probe_survive", queue_name=STEP_QUEUE, broker=first)
    dying = dramatiq.Worker(first, worker_threads=1, worker_timeout=100)
    dying.start()
    for i in range(20):
        sender.send_with_options(args=(f"run-{i}",), delay=300 + 20 * i)
    dying.stop()  # (a SIGKILL holds nothing more: the delayed messages are not in its memory)
    first.close()
    reset_broker()

    second = setup_broker(settings)
    dramatiq.actor(probe, actor_name="probe_survive", queue_name=STEP_QUEUE, broker=second)
    worker = dramatiq.Worker(second, worker_threads=2, worker_timeout=100)
    worker.start()
    try:
        assert _wait_for(lambda: redis_client.llen(done_key) == 20, timeout_s=15)
        assert sorted(x.decode() for x in redis_client.lrange(done_key, 0, -1)) == sorted(f"run-{i}" for i in range(20))
    finally:
        worker.stop()
        second.close()
        reset_broker()


def test_move_due_is_atomic_and_moves_only_due_messages(live_broker: Any, redis_namespace: str,
                                                         redis_client: Any) -> None:
    dramatiq.actor(lambda run_id: None, actor_name="probe_move", queue_name=STEP_QUEUE, broker=live_broker)
    actor = live_broker.get_actor("probe_move")
    actor.send_with_options(args=("soon",), delay=100)
    actor.send_with_options(args=("later",), delay=3_600_000)
    now = int(time.time() * 1000)
    assert live_broker.move_due(now_ms=now) == 0
    assert live_broker.move_due(now_ms=now + 200) == 1
    ready = redis_client.lrange(f"{redis_namespace}:{STEP_QUEUE}", 0, -1)
    assert len(ready) == 1
    moved = json.loads(redis_client.hget(f"{redis_namespace}:{STEP_QUEUE}.msgs", ready[0]))
    assert moved["args"] == ["soon"]
    delayed, envelopes = delayed_keys(redis_namespace, STEP_QUEUE)
    assert redis_client.zcard(delayed) == 1 and redis_client.hlen(envelopes) == 1


def test_one_look_moves_the_due_messages_of_every_queue_in_one_script_call(live_broker: Any, redis_namespace: str,
                                                                          redis_client: Any) -> None:
    """The mover's look costs one round trip to Redis however many queues are declared."""
    dramatiq.actor(lambda run_id: None, actor_name="probe_steps", queue_name=STEP_QUEUE, broker=live_broker)
    dramatiq.actor(lambda run_id: None, actor_name="probe_requests", queue_name=REQUEST_QUEUE, broker=live_broker)
    live_broker.get_actor("probe_steps").send_with_options(args=("step",), delay=100)
    live_broker.get_actor("probe_requests").send_with_options(args=("request",), delay=100)
    assert live_broker.get_declared_queues() == {STEP_QUEUE, REQUEST_QUEUE}
    script = live_broker._move_script
    calls: list[int] = []

    def counting(*, keys: list[str], args: list[Any]) -> Any:
        calls.append(len(keys))
        return script(keys=keys, args=args)

    live_broker._registered_move_script = counting
    assert live_broker.move_due(now_ms=int(time.time() * 1000) + 200) == 2
    assert calls == [8]  # one call, four keys for each of the two queues
    for queue in (STEP_QUEUE, REQUEST_QUEUE):
        assert redis_client.llen(f"{redis_namespace}:{queue}") == 1


def test_a_worker_fetches_one_message_per_thread(live_broker: Any, redis_namespace: str, redis_client: Any) -> None:
    """What a killed worker takes with it is bounded by its threads: with every thread busy, the
    rest of the queue stays ready for other workers."""
    release = threading.Event()
    started: list[str] = []

    def slow(run_id: str) -> None:
        started.append(run_id)
        release.wait(10)

    actor = dramatiq.actor(slow, actor_name="probe_prefetch", queue_name=STEP_QUEUE, broker=live_broker)
    for i in range(8):
        actor.send(f"run-{i}")
    worker = dramatiq.Worker(live_broker, worker_threads=2, worker_timeout=100)
    worker.start()
    try:
        assert _wait_for(lambda: len(started) == 2)
        time.sleep(0.5)
        assert redis_client.llen(f"{redis_namespace}:{STEP_QUEUE}") == 6  # only 2 fetched
    finally:
        release.set()
        worker.stop()


def test_messages_sent_in_a_batch_go_in_one_round_trip_and_a_real_worker_runs_each(
        live_broker: Any, redis_namespace: str, redis_client: Any) -> None:
    """``batched_sends`` (a detection pass's runs) hands its messages to ``enqueue_many``: one
    MULTI/EXEC writing Dramatiq's own layout, which a real Dramatiq worker consumes."""
    from worker import queues
    from worker.queues import batched_sends

    seen: list[str] = []
    actor = dramatiq.actor(lambda run_id: seen.append(run_id), actor_name="probe_batched", queue_name=STEP_QUEUE,
                           broker=live_broker)
    messages = [actor.message_with_options(args=(f"run-{i}",)) for i in range(50)]
    executes: list[int] = []
    real_pipeline = live_broker.client.pipeline

    def counting_pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = real_pipeline(*args, **kwargs)
        real_execute = pipe.execute
        pipe.execute = lambda *a, **k: (executes.append(len(pipe.command_stack)), real_execute(*a, **k))[1]
        return pipe

    live_broker.client.pipeline = counting_pipeline
    try:
        with batched_sends():
            with batched_sends():  # nested: the outer block sends
                queues._batch.messages.extend(messages)  # what send_step does inside the block
            assert executes == [] and redis_client.llen(f"{redis_namespace}:{STEP_QUEUE}") == 0
    finally:
        live_broker.client.pipeline = real_pipeline
    assert executes == [101], executes  # one round trip: an HSET and an RPUSH per message, one ring
    assert redis_client.llen(f"{redis_namespace}:{STEP_QUEUE}") == 50

    worker = dramatiq.Worker(live_broker, worker_threads=2, worker_timeout=100)
    worker.start()
    try:
        assert _wait_for(lambda: len(seen) == 50, timeout_s=15), f"only {len(seen)} of 50 ran"
        assert sorted(seen) == sorted(f"run-{i}" for i in range(50))
    finally:
        worker.stop()


@pytest.fixture()
def looks_clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """A fake clock for ``worker/runtime/looks.py`` and its bells: ``[now]``, advanced only by
    their sleeps."""
    from worker.runtime import bell, looks

    clock = [1000.0]
    fake = type("Clock", (), {"monotonic": staticmethod(lambda: clock[0]),
                              "sleep": staticmethod(lambda seconds: clock.__setitem__(0, clock[0] + seconds))})
    monkeypatch.setattr(looks, "time", fake)
    monkeypatch.setattr(bell, "time", fake)
    return clock


class _SilentBell:
    """A bell that never rings, on the fake clock: each wait passes its whole time."""

    listening = True

    def __init__(self, clock: list[float]) -> None:
        self.clock = clock

    def wait(self, timeout_s: float) -> bool:
        self.clock[0] += timeout_s
        return False

    def drain(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.mark.parametrize("queue_name", [f"{STEP_QUEUE}.DQ", f"{REQUEST_QUEUE}.DQ", STEP_QUEUE, REQUEST_QUEUE])
def test_an_empty_queue_is_looked_at_once_a_second_and_each_look_runs_maintenance(
        live_broker: Any, queue_name: str, looks_clock: list[float], monkeypatch: pytest.MonkeyPatch) -> None:
    """While a queue is empty and its bell silent, its consumer fetches at most once a second, and
    every such fetch runs the dead-worker maintenance that other fetches run only by chance. The
    delay queues (only an older release's leftovers) have no bell."""
    from worker.runtime import looks

    clock = looks_clock
    fetches: list[tuple[str, int]] = []
    real_fetch = live_broker.do_fetch

    def fetch(queue: str, count: int) -> Any:
        fetches.append((queue, live_broker._should_do_maintenance("fetch")))
        return real_fetch(queue, count)

    monkeypatch.setattr(live_broker, "do_fetch", fetch, raising=False)
    quiet = live_broker.consume(queue_name, prefetch=10, timeout=100)
    assert isinstance(quiet, looks.SparseLooks) and quiet.interval_s == 1.0
    assert (quiet.bell is None) == queue_name.endswith(".DQ")
    if quiet.bell is not None:
        quiet.bell.close()
        quiet.bell = _SilentBell(clock)
    while clock[0] < 1000.0 + 3 * quiet.interval_s - 0.05:
        assert next(quiet) is None
    assert fetches == [(queue_name, 1)] * 3  # at 0, 1 and 2 seconds; none in between
    assert sum(live_broker._should_do_maintenance("fetch") for _ in range(2000)) < 1000  # by chance elsewhere


def test_a_look_that_finds_work_keeps_looking_until_the_queue_is_empty(live_broker: Any,
                                                                       looks_clock: list[float]) -> None:
    """A burst of requests is taken at once (up to the prefetch per fetch), not one per second."""
    clock = looks_clock
    actor = dramatiq.actor(lambda run_id: None, actor_name="probe_burst", queue_name=REQUEST_QUEUE, broker=live_broker)
    requests = live_broker.consume(REQUEST_QUEUE, prefetch=2, timeout=100)
    assert next(requests) is None  # the first look: empty; the next one in a second
    for i in range(5):
        actor.send(f"run-{i}")
    clock[0] += 1.0
    taken = []
    for _ in range(5):
        message = next(requests)
        assert message is not None
        taken.append(message.args[0])
        requests.ack(message)
    assert taken == [f"run-{i}" for i in range(5)] and clock[0] == 1001.0  # no wait between them
    assert next(requests) is None


def test_an_older_releases_delay_queue_message_is_still_run(live_broker: Any, redis_url: str,
                                                            redis_namespace: str) -> None:
    """A message an older release put on Dramatiq's delay queue is fetched by the drain and runs
    when due."""
    from dramatiq.brokers.redis import RedisBroker

    seen: list[str] = []
    older = RedisBroker(url=redis_url, namespace=redis_namespace)
    try:
        dramatiq.actor(lambda run_id: None, actor_name="probe_leftover", queue_name=STEP_QUEUE,
                       broker=older).send_with_options(args=("run-1",), delay=200)
    finally:
        older.close()
    dramatiq.actor(lambda run_id: seen.append(run_id), actor_name="probe_leftover", queue_name=STEP_QUEUE, broker=live_broker)
    worker = dramatiq.Worker(live_broker, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        assert _wait_for(lambda: seen == ["run-1"])
    finally:
        worker.stop()


def test_a_look_answers_when_the_earliest_message_still_delayed_is_due(live_broker: Any) -> None:
    dramatiq.actor(lambda run_id: None, actor_name="probe_look_ahead", queue_name=STEP_QUEUE,
                   broker=live_broker).send_with_options(args=("run-1",), delay=60_000)
    dramatiq.actor(lambda run_id: None, actor_name="probe_look_ahead_requests", queue_name=REQUEST_QUEUE,
                   broker=live_broker).send_with_options(args=("run-2",), delay=30_000)
    now = int(time.time() * 1000)
    moved, next_due = live_broker.move_due_and_look_ahead(now_ms=now)
    assert moved == 0 and next_due is not None and now + 29_000 < next_due <= now + 31_000  # the request's
    assert live_broker.move_due_and_look_ahead(now_ms=now + 45_000)[0] == 1
    assert live_broker.move_due_and_look_ahead(now_ms=now + 61_000) == (1, None)


def _mover(broker: Any) -> Any:
    from worker.runtime.delayed import DelayedMessageMover

    return next(m for m in broker.middleware if isinstance(m, DelayedMessageMover))


def test_the_mover_looks_when_a_message_this_process_delayed_is_due(live_broker: Any) -> None:
    """Between its looks (here a minute apart) the mover wakes for what its own process delays."""
    seen: list[float] = []
    _mover(live_broker)._interval_s = 60.0
    actor = dramatiq.actor(lambda run_id: seen.append(time.monotonic()), actor_name="probe_mover_news",
                           queue_name=STEP_QUEUE, broker=live_broker)
    worker = dramatiq.Worker(live_broker, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        time.sleep(0.3)  # the mover's first look is done: its next one is a minute away
        sent_at = time.monotonic()
        actor.send_with_options(args=("run-1",), delay=500)
        assert _wait_for(lambda: seen, timeout_s=10), "the mover slept through its own process's message"
        assert seen[0] - sent_at >= 0.5
    finally:
        worker.stop()


def test_the_mover_finds_what_another_process_delayed_at_its_next_regular_look(
        live_broker: Any, redis_url: str, redis_namespace: str) -> None:
    """A message delayed by a process without a running mover (the CLI, a killed worker) after
    this mover's last look is moved at its next regular one."""
    from worker.runtime.broker import make_redis_broker

    seen: list[str] = []
    _mover(live_broker)._interval_s = 0.5
    dramatiq.actor(lambda run_id: seen.append(run_id), actor_name="probe_mover_other", queue_name=STEP_QUEUE, broker=live_broker)
    worker = dramatiq.Worker(live_broker, worker_threads=1, worker_timeout=100)
    worker.start()
    other = make_redis_broker(redis_url, redis_namespace)  # its mover never runs: no worker
    try:
        time.sleep(0.2)  # the first look found nothing
        dramatiq.actor(lambda run_id: None, actor_name="probe_mover_other", queue_name=STEP_QUEUE,
                       broker=other).send_with_options(args=("run-1",), delay=100)
        assert _wait_for(lambda: seen == ["run-1"], timeout_s=3)
    finally:
        other.close()
        worker.stop()


def test_an_idle_consumer_looks_when_the_bell_rings_for_what_another_process_sent(
        live_broker: Any, redis_url: str, redis_namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a minute between its regular looks, the step queue's consumer takes a message that
    another process sends at once: the send rings the queue's bell, the look answers the ring."""
    from worker.runtime.broker import make_redis_broker

    fetches: list[str] = []
    real_fetch = live_broker.do_fetch
    monkeypatch.setattr(live_broker, "do_fetch", lambda queue, count: (fetches.append(queue), real_fetch(queue, count))[1],
                        raising=False)
    steps = live_broker.consume(STEP_QUEUE, prefetch=2, timeout=100)
    steps.interval_s = 60.0
    other = make_redis_broker(redis_url, redis_namespace)
    try:
        assert next(steps) is None and fetches == [STEP_QUEUE]  # empty; the next regular look in a minute
        for _ in range(3):
            assert next(steps) is None  # waits on the bell, does not look
        assert fetches == [STEP_QUEUE]
        dramatiq.actor(lambda run_id: None, actor_name="probe_bell", queue_name=STEP_QUEUE,
                       broker=other).send("run-1")
        sent_at = time.monotonic()
        message = None
        while message is None and time.monotonic() - sent_at < 10:
            message = next(steps)
        assert message is not None and message.args == ("run-1",), "the ring was not heard"
        assert fetches == [STEP_QUEUE, STEP_QUEUE]  # one look for the ring
        steps.ack(message)
    finally:
        other.close()
        steps.close()


def test_every_sender_of_a_ready_message_rings_the_queues_bell(live_broker: Any, redis_client: Any,
                                                               redis_namespace: str) -> None:
    """``enqueue``, ``enqueue_many``, the delayed-message move and a stopping consumer's requeue
    each ring the bell of the queue they made a message ready on; a delayed send does not."""
    from worker.queues import bell_channel

    listener = redis_client.pubsub(ignore_subscribe_messages=True)
    listener.subscribe(bell_channel(redis_namespace, STEP_QUEUE), bell_channel(redis_namespace, REQUEST_QUEUE))

    def rings() -> list[str]:
        heard, deadline = [], time.monotonic() + 0.5
        while time.monotonic() < deadline:
            reply = listener.get_message(timeout=0.05)
            if reply is not None:
                heard.append(reply["channel"].decode().rsplit(":", 1)[1])
        return heard

    try:
        assert _wait_for(lambda: listener.get_message(timeout=0.05) is None and listener.subscribed)
        steps = dramatiq.actor(lambda run_id: None, actor_name="probe_rings", queue_name=STEP_QUEUE, broker=live_broker)
        requests = dramatiq.actor(lambda run_id: None, actor_name="probe_rings_requests", queue_name=REQUEST_QUEUE,
                                  broker=live_broker)
        steps.send("run-1")
        assert rings() == [f"{STEP_QUEUE}.bell"]
        live_broker.enqueue_many([steps.message("run-2"), steps.message("run-3"), requests.message("run-4")])
        assert sorted(rings()) == sorted([f"{REQUEST_QUEUE}.bell", f"{STEP_QUEUE}.bell"])  # one ring per queue
        steps.send_with_options(args=("run-5",), delay=50)
        assert rings() == []  # not ready yet
        assert live_broker.move_due(now_ms=int(time.time() * 1000) + 1000) == 1
        assert rings() == [f"{STEP_QUEUE}.bell"]
        consumer = live_broker.consume(STEP_QUEUE, prefetch=1, timeout=100)
        fetched = next(consumer)
        assert fetched is not None
        consumer.requeue(m for m in [fetched])  # as a stopping Dramatiq worker passes them: a generator
        assert rings() == [f"{STEP_QUEUE}.bell"]
        consumer.close()
    finally:
        listener.close()


def test_a_consumer_that_may_fetch_no_more_waits_for_a_thread_to_finish_one_then_fetches_for_it(
        live_broker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the consumer holds all it may fetch (its prefetch) it sends Redis nothing and waits
    until a worker thread acknowledges a message (here, with a 10 s timeout, it would otherwise wait
    10 s); the call after that fetches for the freed thread, with no wait for a regular look."""
    actor = dramatiq.actor(lambda run_id: None, actor_name="probe_full", queue_name=STEP_QUEUE, broker=live_broker)
    for i in range(4):
        actor.send(f"run-{i}")
    steps = live_broker.consume(STEP_QUEUE, prefetch=2, timeout=10_000)
    held = [next(steps), next(steps)]
    assert all(held)
    fetches: list[str] = []
    real_fetch = live_broker.do_fetch
    monkeypatch.setattr(live_broker, "do_fetch", lambda queue, count: (fetches.append(queue), real_fetch(queue, count))[1],
                        raising=False)
    answered: list[tuple[Any, float]] = []
    waiting = threading.Thread(target=lambda: answered.append((next(steps), time.monotonic())))
    waiting.start()
    time.sleep(0.3)
    assert not answered  # still waiting: two held, nothing fetched
    acked_at = time.monotonic()
    steps.ack(held.pop())  # as a worker thread does when it finishes the message
    waiting.join(timeout=5)
    assert answered and answered[0][0] is None and answered[0][1] - acked_at < 2.0  # woken by the ack
    assert fetches == []
    assert next(steps) is not None and fetches == [STEP_QUEUE]  # fetched for the freed thread
    steps.close()


def test_a_freed_worker_thread_gets_the_next_message_without_waiting_for_the_worker_timeout(live_broker: Any) -> None:
    """A real Dramatiq worker with a 2 s timeout (Dramatiq's own consumer backs off up to it while
    its threads are all busy, and the freed thread waited out that sleep): each next message starts
    right after the thread frees up."""
    spans: list[tuple[float, float]] = []

    def slow(run_id: str) -> None:
        started = time.monotonic()
        time.sleep(1.2)  # a step waiting on a slow provider: its thread is busy, the CPU is not
        spans.append((started, time.monotonic()))

    actor = dramatiq.actor(slow, actor_name="probe_freed_thread", queue_name=STEP_QUEUE, broker=live_broker)
    for i in range(3):
        actor.send(f"run-{i}")
    worker = dramatiq.Worker(live_broker, worker_threads=1, worker_timeout=2000)
    worker.start()
    try:
        assert _wait_for(lambda: len(spans) == 3, timeout_s=30)
    finally:
        worker.stop()
    spans.sort()
    gaps = [later[0] - earlier[1] for earlier, later in zip(spans, spans[1:])]
    assert max(gaps) < 0.25, f"the freed thread waited {max(gaps):.2f}s"  # Dramatiq's backoff: up to 2 s


def test_a_consumer_whose_subscription_is_cut_still_takes_what_is_sent(
        live_broker: Any, redis_url: str, redis_namespace: str, redis_client: Any) -> None:
    """Redis drops every pub/sub connection (``CLIENT KILL TYPE pubsub``, as a restart or a
    failover would): the consumer subscribes again at once, takes a message sent right after, and
    hears the next ring."""
    from worker.runtime.broker import make_redis_broker

    steps = live_broker.consume(STEP_QUEUE, prefetch=2, timeout=100)
    steps.interval_s = 60.0  # no regular look in this test: only rings are answered
    other = make_redis_broker(redis_url, redis_namespace)
    sender = dramatiq.actor(lambda run_id: None, actor_name="probe_cut_bell", queue_name=STEP_QUEUE, broker=other)

    def taken_within(seconds: float) -> Any:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            message = next(steps)
            if message is not None:
                steps.ack(message)
                return message
        return None

    try:
        assert next(steps) is None and steps.bell.listening
        assert redis_client.client_kill_filter(_type="pubsub") >= 1
        sender.send("run-1")
        message = taken_within(5)
        assert message is not None and message.args == ("run-1",) and steps.bell.listening
        assert taken_within(0.3) is None  # the queue is empty again
        sender.send("run-2")
        message = taken_within(5)
        assert message is not None and message.args == ("run-2",) and steps.bell.listening
    finally:
        other.close()
        steps.close()


def test_while_the_bell_cannot_be_heard_the_queue_is_looked_at_at_dramatiqs_pace(
        live_broker: Any, looks_clock: list[float]) -> None:
    """A bell whose subscription fails (here: nothing listens on its port) makes its consumer look
    every ``idle_sleep_s``, as Dramatiq does, and subscribe again later."""
    import redis

    from worker.runtime.bell import Bell

    clock = looks_clock
    steps = live_broker.consume(STEP_QUEUE, prefetch=2, timeout=100)
    steps.bell.close()
    steps.bell = Bell(redis.Redis(port=1, socket_connect_timeout=0.5), "nowhere.bell")
    fetches: list[float] = []
    real_next = steps.wrapped.__class__.__next__
    steps.wrapped.__class__ = type("Counting", (steps.wrapped.__class__,), {
        "__next__": lambda self: (fetches.append(clock[0]), real_next(self))[1]})
    while clock[0] < 1001.0:
        assert next(steps) is None
    assert not steps.bell.listening
    assert len(fetches) >= 8, fetches  # about every 0.1 s (a look's own backoff sleep counts too)
    steps.close()
