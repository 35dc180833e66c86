"""The orphan scan against the provider stand-in over HTTP, on the test database: keys are judged
by provider key id (not by name), right before they are revoked, and its events are true."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, Iterator

import pytest
from sqlmodel import select

from worker.service.reconcile import revoke_orphans
from tests.scheduler_fakes import add_key, add_provider
from worker.clock import as_utc, set_clock, utcnow
from worker.db.models import AuditEvent, KeyVersion, ManagedKey, ProviderRecord, RotationRun, VersionStage
from worker.protocol.states import RunState
from worker.db.session import session_scope
from worker.providers.base import issued_name
from worker.providers.ratelimit import InMemoryRateLimiter
from worker.providers.registry import build_provider
from keyrotor_sandbox.provider import ProviderHandle, standin_provider_spec, start_provider_in_thread
from worker.secret_refs import make_resolver

pytestmark = pytest.mark.integration
HOUR = timedelta(hours=1)


class Clock:
    def __init__(self) -> None:
        self.at = datetime.now(timezone.utc)
        set_clock(lambda: self.at)

    def go(self, delta: timedelta) -> datetime:
        self.at += delta
        return self.at


@pytest.fixture
def standin() -> Iterator[ProviderHandle]:
    handle = start_provider_in_thread()
    yield handle
    handle.stop()


@pytest.fixture
def clock() -> Iterator[Clock]:
    yield Clock()
    set_clock(None)


def _setup(engine: Any, standin: ProviderHandle, *, spec_changes: dict[str, Any] | None = None) -> int:
    spec = standin_provider_spec(standin.url, admin_token_ref={"env": "SBX_ADMIN"})
    for path, value in (spec_changes or {}).items():
        spec["calls"]["list"]["response"][path] = value
        if value is None:
            del spec["calls"]["list"]["response"][path]
    with session_scope(engine) as s:
        add_provider(s, "sbx", spec)
        s.flush()
        return add_key(s, "sbx/key", "sbx").id  # type: ignore[return-value]


def _run(engine: Any, key_id: int, run_id: str, state: RunState, now: datetime) -> None:
    with session_scope(engine) as s:
        done = now if state in (RunState.completed, RunState.failed) else None
        s.add(RotationRun(id=run_id, key_id=key_id, state=state.value, trigger="schedule", requested_by="scheduler",
                          created_at=now, finished_at=done))


def _version(engine: Any, key_id: int, run_id: str, provider_key: Any, stage: VersionStage) -> None:
    with session_scope(engine) as s:
        s.add(KeyVersion(key_id=key_id, run_id=run_id, credential_type="api_key", stage=stage.value,
                         provider_key_id=provider_key.id, provider_key_name=provider_key.name))


def _factory(standin: ProviderHandle, **hooks: Any) -> Any:
    def build(record: ProviderRecord) -> Any:
        provider = build_provider(record, resolve=make_resolver(None, {"SBX_ADMIN": standin.admin_token}),
                                  limiter=InMemoryRateLimiter(), attempts=1)
        for name, hook in hooks.items():
            setattr(provider, name, hook(getattr(provider, name)))
        return provider
    return build


def _orphan_events(engine: Any) -> list[AuditEvent]:
    with session_scope(engine) as s:
        return list(s.exec(select(AuditEvent).where(AuditEvent.event == "orphan_revoked").order_by(AuditEvent.id)).all())


def test_a_second_key_named_after_a_run_is_revoked_though_the_run_holds_a_key_of_that_name(
        engine, standin, clock) -> None:  # type: ignore[no-untyped-def]
    """Defect: a late issue call minted a second key under the run's name; a live version with that
    *name* made the scan keep every key of the name, so the stray stayed valid forever."""
    key_id = _setup(engine, standin)
    _run(engine, key_id, "run-done-01", RunState.completed, clock.at)
    _run(engine, key_id, "run-open-02", RunState.verified, clock.at)
    current = standin.seed_key(issued_name("run-done-01"))
    stray = standin.seed_key(issued_name("run-done-01"))   # the timed-out issue call that landed late
    in_grace = standin.seed_key(issued_name("run-open-02"))
    stray_open = standin.seed_key(issued_name("run-open-02"))
    _version(engine, key_id, "run-done-01", current, VersionStage.current)
    _version(engine, key_id, "run-open-02", in_grace, VersionStage.pending)

    clock.go(2 * HOUR)
    revoked = revoke_orphans(engine, min_age_s=3600, provider_factory=_factory(standin))
    assert sorted(o.provider_key_id for o in revoked) == sorted([stray.id, stray_open.id])
    assert standin.key(stray.id).revoked and standin.key(stray_open.id).revoked
    assert not standin.key(current.id).revoked and not standin.key(in_grace.id).revoked


def test_a_key_revoked_after_the_list_was_taken_is_judged_now_and_a_404_is_no_event(
        engine, standin, clock) -> None:  # type: ignore[no-untyped-def]
    """Defect: the scan listed once, judged later and counted a 404 as its revocation, stamped
    with the pass's start: events for keys `retire` had revoked, dated before both revocations."""
    key_id = _setup(engine, standin)
    _run(engine, key_id, "run-old-01", RunState.completed, clock.at)
    _run(engine, key_id, "run-gone-02", RunState.failed, clock.at)
    old = standin.seed_key(issued_name("run-old-01"))
    orphan = standin.seed_key(issued_name("run-gone-02"))
    _version(engine, key_id, "run-old-01", old, VersionStage.previous)
    pass_start = clock.go(2 * HOUR)

    def list_then_retire(list_keys: Any) -> Any:
        def listed() -> Any:
            keys = list_keys()
            # meanwhile `retire` revokes the old key and records it (after the list was taken)
            standin.key(old.id).revoked = True
            with session_scope(engine) as s:
                row = s.exec(select(KeyVersion).where(KeyVersion.provider_key_id == old.id)).one()
                row.stage, row.retired_at = VersionStage.retired.value, utcnow()
            return keys
        return listed

    def slow_revoke(revoke: Any) -> Any:
        def timed(**kwargs: Any) -> Any:
            clock.go(timedelta(minutes=5))  # the revocation takes a while (rate limit, slow provider)
            return revoke(**kwargs)
        return timed

    revoked = revoke_orphans(engine, now=pass_start, min_age_s=3600,
                             provider_factory=_factory(standin, list_keys=list_then_retire, revoke=slow_revoke))
    assert [o.provider_key_id for o in revoked] == [orphan.id]
    events = _orphan_events(engine)
    assert [e.detail["provider_key_id"] for e in events] == [orphan.id]   # none for the key retire revoked
    assert events[0].detail["revocation"] == "revoked"
    assert as_utc(events[0].at) > pass_start                                # when it happened, not the pass start


def test_keys_the_list_marks_revoked_are_not_revoked_again_on_every_pass(
        engine, standin, clock) -> None:  # type: ignore[no-untyped-def]
    key_id = _setup(engine, standin, spec_changes={"revoked": "$.revoked"})
    standin.configure(list_revoked=True)
    _run(engine, key_id, "run-gone-01", RunState.failed, clock.at)
    orphan = standin.seed_key(issued_name("run-gone-01"))
    clock.go(2 * HOUR)
    factory = _factory(standin)
    assert [o.provider_key_id for o in revoke_orphans(engine, min_age_s=3600, provider_factory=factory)] == [orphan.id]
    standin.reset_stats()
    for _ in range(3):
        clock.go(HOUR)
        assert revoke_orphans(engine, min_age_s=3600, provider_factory=factory) == []
    assert standin.stats()["routes"].get("revoke", {}) == {}   # no rate budget spent on dead keys
    assert len(_orphan_events(engine)) == 1


def test_without_a_creation_time_the_minimum_age_counts_from_when_the_scan_first_saw_the_key(
        engine, standin, clock) -> None:  # type: ignore[no-untyped-def]
    key_id = _setup(engine, standin, spec_changes={"created_at": None})
    _run(engine, key_id, "run-gone-01", RunState.failed, clock.at - 3 * HOUR)
    orphan = standin.seed_key(issued_name("run-gone-01"))
    factory = _factory(standin)
    assert revoke_orphans(engine, min_age_s=3600, provider_factory=factory) == []   # first seen now: too young
    clock.go(timedelta(minutes=30))
    assert revoke_orphans(engine, min_age_s=3600, provider_factory=factory) == []
    clock.go(timedelta(minutes=31))
    assert [o.provider_key_id for o in revoke_orphans(engine, min_age_s=3600, provider_factory=factory)] == [orphan.id]
