"""Triggers with injected time (no day-long sleeps): expiry, age, deprecation cutoff, the amnesty
header in its phase, a 434 answer → rotation, stuck runs recovered, orphans revoked, and an
emergency burst within the provider's shared rate limit.

Detection and the reconciler run against SQLite and PostgreSQL; providers are the generic HTTP
provider talking to the provider stand-in over real HTTP. Rotation requests go through
``tests.scheduler_fakes.RecordingPipeline`` (the documented request_rotation contract).
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator

import pytest
from sqlmodel import select

from worker.service.deprecation import on_deprecated_response
from worker.service.detection import detect_due
from worker.service.due import refresh_next_due
from worker.service.emergency import request_provider_rotation
from worker.service.reconcile import recover_stuck_runs, revoke_orphans
from worker.service.retirement import retire_due
from tests.scheduler_fakes import ALLOY_SPEC, RecordingPipeline, add_key, add_provider
from worker.clock import set_clock
from worker.db.models import AuditEvent, KeyVersion, ManagedKey, ProviderRecord, RotationRun, VersionStage
from worker.protocol.states import RunState
from worker.db.session import session_scope
from worker.providers.base import CheckOutcome, issued_name
from worker.providers.ratelimit import InMemoryRateLimiter, RedisRateLimiter
from worker.providers.registry import build_provider
from keyrotor_sandbox.provider import ProviderHandle, standin_provider_spec, start_provider_in_thread
from worker.errors import RateLimited
from worker.secret import Secret
from worker.secret_refs import make_resolver

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
DAY = timedelta(days=1)


class Clock:
    def __init__(self, at: datetime) -> None:
        self.at = at
        set_clock(lambda: self.at)

    def go(self, at: datetime) -> datetime:
        self.at = at
        return at


@pytest.fixture
def pipeline() -> RecordingPipeline:
    return RecordingPipeline()


def _runs(engine: Any, key_name: str) -> list[RotationRun]:
    with session_scope(engine) as s:
        key = s.exec(select(ManagedKey).where(ManagedKey.name == key_name)).one()
        return list(s.exec(select(RotationRun).where(RotationRun.key_id == key.id)).all())


def _setup_key(engine: Any, name: str, spec: dict[str, Any] = ALLOY_SPEC, provider: str = "alloy", **fields: Any) -> None:
    with session_scope(engine) as s:
        if s.get(ProviderRecord, provider) is None:
            add_provider(s, provider, spec)
            s.flush()
        key = add_key(s, name, provider, **fields)
        refresh_next_due(s, key)


# --------------------------------------------------------------------------- schedule triggers
def test_key_rotates_on_expiry(engine, pipeline) -> None:  # type: ignore[no-untyped-def]
    clock = Clock(T0)
    _setup_key(engine, "alloy/expiring", expires_at=T0 + 30 * DAY, expiry_lead_time_s=7 * 86400)

    assert detect_due(engine, now=clock.go(T0 + 22 * DAY), pipeline=pipeline.as_pipeline()).requested == []
    result = detect_due(engine, now=clock.go(T0 + 23 * DAY + timedelta(seconds=1)), pipeline=pipeline.as_pipeline())
    assert len(result.requested) == 1
    runs = _runs(engine, "alloy/expiring")
    assert [(r.reason, r.trigger, r.state) for r in runs] == [("expiry", "schedule", "requested")]
    assert pipeline.enqueued == [runs[0].id]  # enqueued after commit
    # the next passes find nothing new: the key has an open run
    assert detect_due(engine, now=clock.go(T0 + 24 * DAY), pipeline=pipeline.as_pipeline()).requested == []
    assert len(_runs(engine, "alloy/expiring")) == 1


def test_key_rotates_on_age(engine, pipeline) -> None:  # type: ignore[no-untyped-def]
    clock = Clock(T0)
    _setup_key(engine, "alloy/aging", last_rotated_at=T0, max_age_s=90 * 86400)
    assert detect_due(engine, now=clock.go(T0 + 89 * DAY), pipeline=pipeline.as_pipeline()).requested == []
    assert len(detect_due(engine, now=clock.go(T0 + 90 * DAY), pipeline=pipeline.as_pipeline()).requested) == 1
    assert [r.reason for r in _runs(engine, "alloy/aging")] == ["max_age"]


def test_key_rotates_to_the_replacement_before_a_deprecation_cutoff(engine, pipeline) -> None:  # type: ignore[no-untyped-def]
    cutoff = T0 + 60 * DAY
    spec = dict(ALLOY_SPEC, credential_types={
        "api_key": {"replacement": "pat", "deprecation": [
            {"phase": "amnesty", "from": cutoff.isoformat(), "headers": {"Amnesty": "true"}}]},
        "pat": {},
    })
    clock = Clock(T0)
    _setup_key(engine, "dep/key", spec=spec, provider="dep", max_age_s=365 * 86400, expiry_lead_time_s=7 * 86400)
    assert detect_due(engine, now=clock.go(cutoff - 8 * DAY), pipeline=pipeline.as_pipeline()).requested == []
    assert len(detect_due(engine, now=clock.go(cutoff - 7 * DAY), pipeline=pipeline.as_pipeline()).requested) == 1
    [run] = _runs(engine, "dep/key")
    assert run.reason == "deprecation" and run.target_credential_type == "pat"


def _fail(engine: Any, run_id: str, at: datetime) -> None:
    with session_scope(engine) as s:  # the pipeline failed it (and alerted)
        r = s.get(RotationRun, run_id)
        r.state, r.finished_at = RunState.failed.value, at


def test_a_failed_scheduled_run_is_retried_with_backoff_while_the_key_stays_due(engine, pipeline) -> None:  # type: ignore[no-untyped-def]
    """Not in a loop (15 min, then 30, 60… at most 6 h after the last run ended), never given up
    while the key is due, and a backing-off key does not hold back the others."""
    clock = Clock(T0)
    _setup_key(engine, "alloy/a", expires_at=T0 + 8 * DAY)
    _setup_key(engine, "alloy/b", expires_at=T0 + 8 * DAY + timedelta(minutes=5))
    start = T0 + 1 * DAY + timedelta(minutes=1)
    detect_due(engine, now=clock.go(start), pipeline=pipeline.as_pipeline())
    [first] = _runs(engine, "alloy/a")
    _fail(engine, first.id, start)
    # 14 minutes later: still backing off; b (due now) is not held back by it, even with batch=1.
    result = detect_due(engine, now=clock.go(start + timedelta(minutes=14)), pipeline=pipeline.as_pipeline(), batch=1)
    assert len(_runs(engine, "alloy/b")) == 1 and len(_runs(engine, "alloy/a")) == 1
    ended = start
    for attempt, wait in enumerate([timedelta(minutes=15), timedelta(minutes=30), timedelta(hours=1)], start=1):
        assert detect_due(engine, now=clock.go(ended + wait - timedelta(seconds=1)), pipeline=pipeline.as_pipeline()).requested == []
        result = detect_due(engine, now=clock.go(ended + wait), pipeline=pipeline.as_pipeline())
        runs = sorted(_runs(engine, "alloy/a"), key=lambda r: r.created_at)
        assert len(result.requested) == 1 and len(runs) == attempt + 1
        assert runs[-1].idempotency_key.endswith(f":retry{attempt}") and runs[-1].reason == "expiry"
        ended = clock.at + timedelta(minutes=1)
        _fail(engine, runs[-1].id, ended)
    # Capped at 6 hours, however many runs failed.
    from worker.service.detection import retry_backoff

    assert retry_backoff(20) == timedelta(hours=6) and retry_backoff(1) == timedelta(minutes=15)


def test_two_detection_passes_at_once_make_one_run_per_key(engine) -> None:  # type: ignore[no-untyped-def]
    clock = Clock(T0)
    for i in range(20):
        _setup_key(engine, f"alloy/k{i:02d}", expires_at=T0 + DAY)
    clock.go(T0 + DAY)
    pipes = [RecordingPipeline(), RecordingPipeline()]
    threads = [threading.Thread(target=detect_due, args=(engine,), kwargs={"pipeline": p.as_pipeline()}) for p in pipes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with session_scope(engine) as s:
        runs = s.exec(select(RotationRun)).all()
    assert len(runs) == 20 and len({r.key_id for r in runs}) == 20
    assert sorted(pipes[0].enqueued + pipes[1].enqueued) == sorted(r.id for r in runs)


# --------------------------------------------------------------------------- deprecation over HTTP
ASANA_TYPES = {
    "api_key": {"replacement": "personal_access_token", "deprecation": [
        {"phase": "no_new_credentials", "from": "2016-01-01T00:00:00Z"},
        {"phase": "amnesty", "from": "2017-01-01T00:00:00Z", "headers": {"Asana-Amnesty-Api-Key": "true"}},
        {"phase": "rejected", "from": "2017-02-01T00:00:00Z"},
    ]},
    "personal_access_token": {},
}


@pytest.fixture
def standin() -> Iterator[ProviderHandle]:
    handle = start_provider_in_thread()
    yield handle
    handle.stop()


def _provider(handle: ProviderHandle, record: ProviderRecord, limiter: Any = None, attempts: int = 1) -> Any:
    resolve = make_resolver(None, {"SBX_ADMIN": handle.admin_token})
    return build_provider(record, resolve=resolve, limiter=limiter or InMemoryRateLimiter(), attempts=attempts)


def test_amnesty_header_is_sent_in_its_phase_and_a_434_triggers_a_rotation(sqlite_url, standin, pipeline) -> None:  # type: ignore[no-untyped-def]
    from worker.db.session import make_engine

    engine = make_engine(sqlite_url)
    spec = standin_provider_spec(standin.url, admin_token_ref={"env": "SBX_ADMIN"}, credential_types=ASANA_TYPES)
    clock = Clock(datetime(2016, 6, 1, tzinfo=timezone.utc))
    _setup_key(engine, "asana/automation", spec=spec, provider="asana")
    with session_scope(engine) as s:
        record = s.get(ProviderRecord, "asana")
    provider = _provider(standin, record)
    old = Secret(standin.seed_key("legacy", credential_type="api_key").secret)

    # The provider now demands the amnesty header. Before the amnesty phase we do not send it → 434.
    standin.set_deprecation("api_key", "amnesty")
    assert provider.check(old, credential_type="api_key") == CheckOutcome.deprecated
    # Inside the phase keyrotor adds the header automatically → accepted.
    clock.go(datetime(2017, 1, 15, tzinfo=timezone.utc))
    assert provider.check(old, credential_type="api_key") == CheckOutcome.valid

    # Rejected: every call answers 434 → an immediate rotation to the replacement type.
    clock.go(datetime(2017, 2, 2, tzinfo=timezone.utc))
    standin.set_deprecation("api_key", "rejected")
    assert provider.check(old, credential_type="api_key") == CheckOutcome.deprecated
    with session_scope(engine) as s:
        run = on_deprecated_response(s, key_name="asana/automation", credential_type="api_key", pipeline=pipeline.as_pipeline())
        assert run is not None
        run_id = run.id
    with session_scope(engine) as s:  # every further 434 joins the same run
        again = on_deprecated_response(s, key_name="asana/automation", credential_type="api_key", pipeline=pipeline.as_pipeline())
        assert again is not None and again.id == run_id
        # a 434 about a type the key no longer uses is stale
        assert on_deprecated_response(s, key_name="asana/automation", credential_type="legacy_type", pipeline=pipeline.as_pipeline()) is None
    [stored] = _runs(engine, "asana/automation")
    assert (stored.trigger, stored.reason, stored.target_credential_type) == ("deprecation", "deprecation", "personal_access_token")
    assert pipeline.enqueued == [run_id]
    engine.dispose()


# --------------------------------------------------------------------------- reconciler
def _open_run(engine: Any, key_name: str, run_id: str, state: RunState, deadline: datetime, **fields: Any) -> None:
    with session_scope(engine) as s:
        key = s.exec(select(ManagedKey).where(ManagedKey.name == key_name)).one()
        s.add(RotationRun(id=run_id, key_id=key.id, state=state.value, trigger="schedule", requested_by="scheduler",
                          created_at=T0, updated_at=T0, step_deadline_at=deadline, **fields))


def test_stuck_runs_are_reenqueued_then_go_to_needs_attention(engine, pipeline) -> None:  # type: ignore[no-untyped-def]
    clock = Clock(T0)
    _setup_key(engine, "alloy/stuck", max_age_s=86400)
    _setup_key(engine, "alloy/waiting", max_age_s=86400)
    _setup_key(engine, "alloy/fine", max_age_s=86400)
    _open_run(engine, "alloy/stuck", "run-stuck", RunState.issued, T0 + timedelta(minutes=5))
    _open_run(engine, "alloy/waiting", "run-deposit", RunState.awaiting_deposit, T0 + timedelta(minutes=5))
    _open_run(engine, "alloy/fine", "run-fine", RunState.promoted, T0 + timedelta(hours=5))
    alerts: list[tuple[str, str, str | None]] = []

    def notify(event: str, *, key_name: str, run_id: str | None, detail: dict[str, Any]) -> None:
        alerts.append((event, key_name, run_id))

    now = clock.go(T0 + timedelta(minutes=10))
    for attempt in (1, 2, 3):
        result = recover_stuck_runs(engine, now=now, max_attempts=3, step_timeout_s=600, pipeline=pipeline.as_pipeline(), notify=notify)
        assert result.requeued == ["run-stuck"]
        # a second pass before the new deadline does nothing (no double enqueue)
        assert recover_stuck_runs(engine, now=now, max_attempts=3, pipeline=pipeline.as_pipeline(), notify=notify).requeued == []
        now = clock.go(now + timedelta(minutes=11))
    assert pipeline.enqueued == ["run-stuck"] * 3
    result = recover_stuck_runs(engine, now=now, max_attempts=3, pipeline=pipeline.as_pipeline(), notify=notify)
    assert result.needs_attention == ["run-stuck"] and result.requeued == []
    assert alerts == [("needs_attention", "alloy/stuck", "run-stuck")]
    with session_scope(engine) as s:
        stuck = s.get(RotationRun, "run-stuck")
        assert stuck.state == RunState.needs_attention.value and stuck.requeues == 3 and "3 re-enqueues" in stuck.last_error
        assert stuck.attempts == 0  # the step's own retry count is not the reconciler's
        assert s.get(RotationRun, "run-deposit").requeues == 0  # a person acts next: left alone
        events = s.exec(select(AuditEvent.event).where(AuditEvent.run_id == "run-stuck").order_by(AuditEvent.id)).all()
    assert events == ["requeued", "requeued", "requeued", "state_changed"]
    # needs_attention is left alone from now on
    assert recover_stuck_runs(engine, now=now + DAY, max_attempts=3, pipeline=pipeline.as_pipeline(), notify=notify).needs_attention == []


def test_retirement_enqueues_runs_whose_grace_is_over_once(engine, pipeline) -> None:  # type: ignore[no-untyped-def]
    clock = Clock(T0)
    _setup_key(engine, "alloy/grace", max_age_s=86400)
    with session_scope(engine) as s:
        key = s.exec(select(ManagedKey)).one()
        s.add(RotationRun(id="run-grace", key_id=key.id, state=RunState.verified.value, trigger="schedule",
                          requested_by="scheduler", created_at=T0, grace_until=T0 + timedelta(hours=1)))
    assert retire_due(engine, now=clock.go(T0 + timedelta(minutes=59)), pipeline=pipeline.as_pipeline()) == []
    assert retire_due(engine, now=clock.go(T0 + timedelta(hours=1)), pipeline=pipeline.as_pipeline()) == ["run-grace"]
    assert retire_due(engine, now=clock.go(T0 + timedelta(hours=1, minutes=1)), pipeline=pipeline.as_pipeline()) == []
    assert pipeline.enqueued == ["run-grace"]
    # if the retire step never ran, the reconciler picks it up after the step deadline
    later = clock.go(T0 + timedelta(hours=2))
    assert recover_stuck_runs(engine, now=later, step_timeout_s=60, pipeline=pipeline.as_pipeline()).requeued == ["run-grace"]


def test_orphans_are_found_through_the_list_call_and_revoked(engine, standin) -> None:  # type: ignore[no-untyped-def]
    clock = Clock(datetime.now(timezone.utc))
    spec = standin_provider_spec(standin.url, admin_token_ref={"env": "SBX_ADMIN"})
    _setup_key(engine, "sbx/key", spec=spec, provider="sbx", max_age_s=86400)
    with session_scope(engine) as s:
        key = s.exec(select(ManagedKey)).one()
        s.add(RotationRun(id="runfailed01", key_id=key.id, state=RunState.failed.value, trigger="schedule",
                          requested_by="scheduler", created_at=clock.at, finished_at=clock.at))
        s.add(RotationRun(id="runlive0001", key_id=key.id, state=RunState.completed.value, trigger="schedule",
                          requested_by="scheduler", created_at=clock.at, finished_at=clock.at))
        s.add(RotationRun(id="runopen0001", key_id=key.id, state=RunState.requested.value, trigger="schedule",
                          requested_by="scheduler", created_at=clock.at))
    failed = standin.seed_key(issued_name("runfailed01"))      # compensation did not get to revoke it
    unknown = standin.seed_key(issued_name("ghostrun0001"))    # the DB has never heard of this run
    live = standin.seed_key(issued_name("runlive0001"))        # current version: must stay
    in_flight = standin.seed_key(issued_name("runopen0001"))   # its run is still issuing: must stay
    human = standin.seed_key("ci-token-made-by-a-person")      # not ours: never touched
    with session_scope(engine) as s:
        s.add(KeyVersion(key_id=key.id, run_id="runlive0001", credential_type="api_key", stage=VersionStage.current.value,
                         provider_key_id=live.id, provider_key_name=live.name))
        s.add(KeyVersion(key_id=key.id, run_id="runfailed01", credential_type="api_key", stage=VersionStage.failed.value,
                         provider_key_id=failed.id, provider_key_name=failed.name))
        record = s.get(ProviderRecord, "sbx")

    factory = lambda rec: _provider(standin, rec)  # noqa: E731
    # Too young: a key whose issue step has not recorded it yet is never touched.
    assert revoke_orphans(engine, now=clock.at, min_age_s=3600, provider_factory=factory) == []
    revoked = revoke_orphans(engine, now=clock.go(clock.at + timedelta(hours=2)), min_age_s=3600, provider_factory=factory)
    assert sorted(o.name for o in revoked) == sorted([failed.name, unknown.name])
    assert standin.key(failed.id).revoked and standin.key(unknown.id).revoked
    assert not standin.key(live.id).revoked and not standin.key(in_flight.id).revoked and not standin.key(human.id).revoked
    with session_scope(engine) as s:
        audit = s.exec(select(AuditEvent).where(AuditEvent.event == "orphan_revoked")).all()
    assert sorted(a.detail["name"] for a in audit) == sorted([failed.name, unknown.name])
    assert {a.actor for a in audit} == {"reconciler"}
    # second pass: nothing left to do (revoked keys are no longer listed)
    assert revoke_orphans(engine, now=clock.at, min_age_s=3600, provider_factory=factory) == []
    assert record is not None


# --------------------------------------------------------------------------- emergency
def test_emergency_rotation_requests_every_key_and_the_burst_stays_within_the_shared_rate_limit(
        sqlite_url, standin, redis_url, redis_namespace, pipeline) -> None:  # type: ignore[no-untyped-def]
    import redis

    from worker.db.session import make_engine

    engine = make_engine(sqlite_url)
    Clock(T0)
    limit, per = 10, 1.0
    standin.configure(rate_limit={"requests": limit, "per": per})  # the provider answers 429 above it
    spec = standin_provider_spec(standin.url, admin_token_ref={"env": "SBX_ADMIN"}, rate_limit={"requests": limit, "per": f"{per:g}s"})
    for i in range(25):
        _setup_key(engine, f"wf/user{i:02d}", spec=spec, provider="wf", max_age_s=86400)
    _setup_key(engine, "wf/disabled", spec=spec, provider="wf", max_age_s=86400, enabled=False)
    with session_scope(engine) as s:
        runs = request_provider_rotation(s, provider="wf", requested_by="cli:test", batch_id="breach-1", pipeline=pipeline.as_pipeline())
        run_ids = [r.id for r, created in runs if created]
        record = s.get(ProviderRecord, "wf")
    assert len(run_ids) == 25 and len(set(run_ids)) == 25
    with session_scope(engine) as s:  # the same request again joins the same runs
        again = request_provider_rotation(s, provider="wf", requested_by="cli:test", batch_id="breach-1", pipeline=pipeline.as_pipeline())
        assert sorted(r.id for r, _ in again) == sorted(run_ids)
        assert not any(created for _, created in again)
        assert all(r.emergency and r.trigger == "emergency" and r.reason == "breach" for r, _ in again)

    # Three "workers", each with its own limiter instance on the same Redis, issue the new keys.
    todo = list(run_ids)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        limiter = RedisRateLimiter(redis.Redis.from_url(redis_url), namespace=redis_namespace, max_wait=30)
        provider = _provider(standin, record, limiter, attempts=3)  # in-call retries honour Retry-After
        while True:
            with lock:
                if not todo:
                    return
                run_id = todo.pop()
            try:
                provider.issue(name=issued_name(run_id), credential_type="api_key", labels={})
            except RateLimited:  # the step is retried later, as Dramatiq does
                with lock:
                    todo.insert(0, run_id)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

    standin.reset_stats()
    started = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    elapsed = time.monotonic() - started
    assert errors == []
    issue_stats = {str(k): v for k, v in standin.stats()["routes"].get("issue", {}).items()}
    throttled = issue_stats.get("429", 0)
    assert issue_stats.get("201") == 25, issue_stats
    # The shared limiter paces the three workers: without it 25 calls would take milliseconds and
    # the provider would refuse 15 of them. The limiter keeps an exact sliding window (plus a small
    # margin); only network jitter between admission and arrival could still put one call over an
    # edge, and that 429 then blocks every worker for its Retry-After (shared through Redis).
    assert throttled <= 1, issue_stats
    assert 1.0 <= elapsed < 8.0, elapsed
    print(f"\nemergency burst: 25 keys issued in {elapsed:.2f}s at a shared limit of {limit}/{per:g}s "
          f"by 3 workers; provider refused {throttled} call(s) at a window edge")
    engine.dispose()


def test_emergency_for_an_unknown_provider_says_what_to_do(sqlite_url, pipeline) -> None:  # type: ignore[no-untyped-def]
    from worker.db.session import make_engine
    from worker.errors import ConfigError

    engine = make_engine(sqlite_url)
    with session_scope(engine) as s, pytest.raises(ConfigError, match="config apply"):
        request_provider_rotation(s, provider="nope", requested_by="cli:test", pipeline=pipeline.as_pipeline())
    engine.dispose()


def test_detection_with_the_real_request_rotation(engine) -> None:  # type: ignore[no-untyped-def]
    """Same expiry trigger through worker.pipeline.requests (audit trail included); messages recorded."""
    from worker.service.hooks import Pipeline
    from worker.pipeline.requests import request_rotation

    sent: list[str] = []
    real = Pipeline(request_rotation=request_rotation, enqueue_run=lambda run: sent.append(run.id))
    clock = Clock(T0)
    _setup_key(engine, "alloy/real", expires_at=T0 + 10 * DAY, expiry_lead_time_s=7 * 86400)
    assert detect_due(engine, now=clock.go(T0 + 2 * DAY), pipeline=real).requested == []
    result = detect_due(engine, now=clock.go(T0 + 3 * DAY), pipeline=real)
    [run] = _runs(engine, "alloy/real")
    assert result.requested == [run.id] == sent
    assert (run.reason, run.trigger, run.requested_by) == ("expiry", "schedule", "scheduler")
    assert detect_due(engine, now=clock.go(T0 + 4 * DAY), pipeline=real).requested == []
    with session_scope(engine) as s:
        events = s.exec(select(AuditEvent.event).where(AuditEvent.run_id == run.id)).all()
    assert events == ["state_changed"]


def test_a_failed_due_run_is_tried_again_through_the_real_request_rotation(engine) -> None:  # type: ignore[no-untyped-def]
    """The retry's idempotency key is new (``…:retry1``), so the real request_rotation creates a
    run instead of returning the failed one; while it is open, no further run."""
    from worker.service.hooks import Pipeline
    from worker.pipeline.requests import request_rotation

    sent: list[str] = []
    real = Pipeline(request_rotation=request_rotation, enqueue_run=lambda run: sent.append(run.id))
    clock = Clock(T0)
    _setup_key(engine, "alloy/retry", expires_at=T0 + 10 * DAY, expiry_lead_time_s=7 * 86400)
    [first] = detect_due(engine, now=clock.go(T0 + 3 * DAY), pipeline=real).requested
    _fail(engine, first, T0 + 3 * DAY + timedelta(minutes=2))
    assert detect_due(engine, now=clock.go(T0 + 3 * DAY + timedelta(minutes=10)), pipeline=real).requested == []
    [second] = detect_due(engine, now=clock.go(T0 + 3 * DAY + timedelta(minutes=17)), pipeline=real).requested
    assert second != first and sent == [first, second]
    assert detect_due(engine, now=clock.go(T0 + 3 * DAY + timedelta(minutes=18)), pipeline=real).requested == []
