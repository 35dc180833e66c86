"""The pipeline on real services: RedisBroker (unique namespace) with an in-process Dramatiq
worker, SQLite and PostgreSQL, and the real VaultStore against a real OpenBao server.
The provider and integrations are in-memory fakes of their contracts."""

from __future__ import annotations

import threading
import time

import pytest
from sqlmodel import Session

from tests.fakes_pipeline import FakeProvider, World, all_rows_text
from worker.clock import set_clock
from worker.db.models import RotationRun
from worker.protocol.states import RunState
from worker.db.session import session_scope
from worker.errors import PermanentError, StateConflict
from worker.runtime.broker import make_redis_broker, setup_broker
from worker.pipeline.context import StepPolicy, configure
from worker.pipeline.outbox import enqueue_run
from worker.pipeline.runs import load_run, transition
from worker.runtime.workers import start_worker
from worker.settings import load_settings
from worker.vault.store import VaultStore

pytestmark = pytest.mark.integration


@pytest.fixture
def live(db_url, redis_url, redis_namespace, vault, vault_mount):  # type: ignore[no-untyped-def]
    settings = load_settings(vault_addr=vault.addr, vault_token=vault.token, vault_mount=vault_mount,
                             database_url=db_url, redis_url=redis_url, queue_namespace=redis_namespace)
    store = VaultStore.from_settings(settings)
    world = World(url=db_url, provider=FakeProvider()).build(
        grace_period_s=0, policy=StepPolicy(max_retries=3, min_backoff_ms=10, max_backoff_ms=50,
                                            time_limit_ms=20_000, activation_poll_s=0.05, activation_timeout_s=5))
    set_clock(None)
    # Seed the real Vault with the key's current secret and use it instead of the in-memory fake.
    store.write(vault_mount, world.key.vault_path, {"api_key": world.old.secret, "keyrotor_key_id": world.old.key_id})
    with session_scope(world.engine) as session:
        from worker.db.models import ManagedKey
        key = session.get(ManagedKey, world.key.id)
        key.vault_mount = vault_mount
        session.add(key)
    world.key.vault_mount = vault_mount
    world.ctx.vault = store
    broker = setup_broker(broker=make_redis_broker(redis_url, redis_namespace))
    configure(world.ctx)
    worker = start_worker(broker, threads=4)
    yield world, store, broker
    worker.stop()
    configure(None)
    broker.close()


def wait_for(world: World, run_id: str, states: set[RunState], timeout: float = 20) -> RunState:
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        with Session(world.engine) as session:
            state = RunState(session.get(RotationRun, run_id).state)
        if state in states:
            return state
        time.sleep(0.05)
    raise AssertionError(f"run {run_id} stuck in {state}")


def start(world: World, **kwargs) -> str:  # type: ignore[no-untyped-def]
    run_id = world.request(**kwargs)
    with Session(world.engine) as session:
        enqueue_run(session.get(RotationRun, run_id))
    return run_id


def test_rotation_end_to_end_on_redis(live, redis_client, redis_namespace) -> None:  # type: ignore[no-untyped-def]
    world, store, broker = live
    t0 = time.monotonic()
    run_id = start(world)
    assert wait_for(world, run_id, {RunState.completed, RunState.failed, RunState.needs_attention}) == RunState.completed
    elapsed = time.monotonic() - t0
    print(f"\nend-to-end rotation over Redis + OpenBao: {elapsed * 1000:.0f} ms")
    new_secret = world.provider.issued_secrets[0]
    current = store.read_current(world.key.vault_mount, world.key.vault_path, "api_key")
    assert current.secret.reveal() == new_secret and current.provider_key_id == "k-2"
    assert not world.provider.is_valid(world.old.secret)
    # Invariant 5: no secret in any Redis key or value of this namespace, nor in any DB row.
    redis_text = ""
    for key in redis_client.scan_iter(match=f"{redis_namespace}*"):
        redis_text += repr(key)
        kind = redis_client.type(key)
        if kind == b"hash":
            redis_text += repr(redis_client.hgetall(key))
        elif kind == b"list":
            redis_text += repr(redis_client.lrange(key, 0, -1))
        elif kind == b"string":
            redis_text += repr(redis_client.get(key))
    rows = all_rows_text(world.engine)
    for secret in (new_secret, world.old.secret):
        assert secret not in redis_text and secret not in rows


def test_failure_after_promotion_rolls_back_in_real_vault(live) -> None:  # type: ignore[no-untyped-def]
    world, store, broker = live
    world.integrations["svc-b"].faults.add("push", PermanentError("410 gone"))
    run_id = start(world)
    assert wait_for(world, run_id, {RunState.rolled_back, RunState.needs_attention, RunState.completed}) == RunState.rolled_back
    current = store.read_current(world.key.vault_mount, world.key.vault_path, "api_key")
    assert current.secret.reveal() == world.old.secret and current.version == 3
    assert world.provider.is_valid(world.old.secret)


def test_racing_transitions_one_wins(live) -> None:  # type: ignore[no-untyped-def]
    """Invariant 7 on the real database: N threads try the same conditional transition."""
    world, store, broker = live
    run_id = world.request(not_before=None)
    with Session(world.engine, expire_on_commit=False) as session:
        stale = load_run(session, run_id)
    wins, conflicts = [], []
    barrier = threading.Barrier(6)

    def racer() -> None:
        barrier.wait()
        try:
            with session_scope(world.engine) as session:
                transition(session, stale, RunState.cancelled, actor=f"worker:{threading.get_ident()}")
            wins.append(1)
        except StateConflict:
            conflicts.append(1)
        except Exception as exc:  # SQLite may report "database is locked" to a loser: also a loss
            conflicts.append(exc)

    threads = [threading.Thread(target=racer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(conflicts) == 5


def test_external_producer_envelope_via_raw_redis(live, redis_client, redis_namespace) -> None:  # type: ignore[no-untyped-def]
    """A Dramatiq envelope written by hand (the recipe docs/queue-message.md used to give, before the
    request stream) is still consumed by the worker."""
    import json
    import uuid

    world, store, broker = live
    mid = str(uuid.uuid4())
    body = {"version": 1, "key": world.key.name, "reason": "manual", "requested_by": "ops:alice",
            "idempotency_key": f"ops-{mid}"}
    envelope = {"queue_name": "rotation_requests", "actor_name": "rotation_requests", "args": [body], "kwargs": {},
                "options": {"redis_message_id": mid}, "message_id": mid, "message_timestamp": int(time.time() * 1000)}
    pipe = redis_client.pipeline(transaction=True)
    pipe.hset(f"{redis_namespace}:rotation_requests.msgs", mid, json.dumps(envelope))
    pipe.rpush(f"{redis_namespace}:rotation_requests", mid)
    pipe.execute()
    from sqlmodel import select
    deadline = time.monotonic() + 10
    run = None
    while run is None and time.monotonic() < deadline:
        with Session(world.engine) as session:
            run = session.exec(select(RotationRun).where(RotationRun.idempotency_key == f"ops-{mid}")).first()
        time.sleep(0.05)
    assert run is not None, "the worker did not consume the raw envelope"
    assert wait_for(world, run.id, {RunState.completed}) == RunState.completed


# --------------------------------------------------------------------------- the request stream
def _stream_consumer(redis_url, namespace, engine, name="live", claim_idle_ms=30_000):  # type: ignore[no-untyped-def]
    import redis

    from worker.runtime.stream import RequestStreamConsumer, StreamSettings

    client = redis.Redis.from_url(redis_url)
    return RequestStreamConsumer(client, namespace=namespace, engine=engine, name=name,
                                 options=StreamSettings(claim_idle_ms=claim_idle_ms, block_ms=100))


def _documented_xadd() -> str:
    """The redis-cli line docs/queue-message.md shows producers (the test runs exactly that)."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "queue-message.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", doc, re.S)
    lines = [line for block in blocks for line in block.splitlines() if line.startswith("redis-cli") and " XADD " in line]
    assert len(lines) == 1, lines
    return lines[0]


def _runs_for(world: World) -> list[RotationRun]:
    from sqlmodel import select

    with Session(world.engine) as session:
        return list(session.exec(select(RotationRun).where(RotationRun.key_id == world.key.id)).all())


def test_request_published_with_redis_cli_as_documented_completes(live, redis_url, redis_namespace) -> None:  # type: ignore[no-untyped-def]
    import os
    import subprocess
    import uuid

    from worker.runtime.stream import StreamThread

    world, store, broker = live
    command = _documented_xadd()
    idem = f"ops-{uuid.uuid4().hex}"
    # The documented line names the default namespace and the example key; this test's differ.
    command = (command.replace("keyrotor:rotation-requests", f"{redis_namespace}:rotation-requests")
               .replace("alloy/reporting", world.key.name).replace("ops-2026-06-01-1", idem))
    thread = StreamThread(_stream_consumer(redis_url, redis_namespace, world.engine)).start()
    try:
        published = subprocess.run(["bash", "-c", command], env={**os.environ, "KEYROTOR_REDIS_URL": redis_url},
                                   capture_output=True, text=True, timeout=30)
        assert published.returncode == 0, published.stderr
        deadline = time.monotonic() + 20
        while not _runs_for(world) and time.monotonic() < deadline:
            time.sleep(0.05)
        runs = _runs_for(world)
        assert len(runs) == 1 and runs[0].idempotency_key == idem and runs[0].trigger == "queue"
        assert wait_for(world, runs[0].id, {RunState.completed, RunState.failed, RunState.needs_attention}) == RunState.completed
    finally:
        thread.stop()


def test_request_held_by_a_dead_consumer_is_applied_once(live, redis_url, redis_client, redis_namespace) -> None:  # type: ignore[no-untyped-def]
    """One consumer read the entry and died before acknowledging; another, after applying it and
    dying too; a live consumer claims it: one run, completed, nothing left pending."""
    import json

    from worker.pipeline.messages import consume
    from worker.runtime.stream import GROUP, stream_key

    world, store, broker = live
    stream = stream_key(redis_namespace)
    live_consumer = _stream_consumer(redis_url, redis_namespace, world.engine, claim_idle_ms=200)
    live_consumer.ensure_group()
    body = {"version": 1, "key": world.key.name, "requested_by": "ci:job-7"}  # no idempotency key
    entry = redis_client.xadd(stream, {"request": json.dumps(body)})
    # Consumer "a" reads it and dies; after the idle time "b" claims it, applies it, dies before XACK.
    read = redis_client.xreadgroup(GROUP, "a", {stream: ">"}, count=1)
    assert read[0][1][0][0] == entry
    time.sleep(0.3)
    claimed = redis_client.xautoclaim(stream, GROUP, "b", 200, start_id="0-0", count=1)
    assert claimed[1][0][0] == entry
    consume(claimed[1][0][1][b"request"], engine=world.engine, message_id=f"stream:{entry.decode()}",
            default_idempotency_key=f"stream:{entry.decode()}")
    first = _runs_for(world)
    assert len(first) == 1
    # The run it started completes; only then does a live consumer find the entry still pending.
    assert wait_for(world, first[0].id, {RunState.completed, RunState.failed, RunState.needs_attention}) == RunState.completed
    # The entry becomes claimable once it has been idle for claim_idle_ms since b claimed it (the
    # run, all its steps in one message, may complete sooner than that).
    time.sleep(0.3)
    assert live_consumer.poll(block_ms=100) == 1  # it claims and applies the entry again ...
    runs = _runs_for(world)
    assert [r.id for r in runs] == [first[0].id], "a redelivered entry must not rotate the key a second time"
    assert redis_client.xpending(stream, GROUP)["pending"] == 0


def test_rejected_stream_entries_are_dead_lettered_and_acknowledged(live, redis_url, redis_client, redis_namespace) -> None:  # type: ignore[no-untyped-def]
    from worker.runtime.stream import GROUP, dead_letter_key, stream_key

    world, store, broker = live
    consumer = _stream_consumer(redis_url, redis_namespace, world.engine)
    consumer.ensure_group()
    stream = stream_key(redis_namespace)
    bad = [redis_client.xadd(stream, {"request": "not json"}),
           redis_client.xadd(stream, {"request": '{"version": 1, "key": "no/such-key", "requested_by": "x"}'}),
           redis_client.xadd(stream, {"body": "{}"})]
    handled = 0
    deadline = time.monotonic() + 10
    while handled < 3 and time.monotonic() < deadline:
        handled += consumer.poll(block_ms=100)
    letters = redis_client.xrange(dead_letter_key(redis_namespace))
    assert [fields[b"entry"] for _, fields in letters] == bad
    assert [fields[b"code"] for _, fields in letters] == [b"not_json", b"refused", b"no_request_field"]
    assert redis_client.xpending(stream, GROUP)["pending"] == 0
    assert consumer.poll(block_ms=100) == 0  # nothing loops
    assert _runs_for(world) == []
