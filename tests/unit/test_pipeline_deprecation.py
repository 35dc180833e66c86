"""Deprecated credentials in the pipeline (Asana's 434): the new credential deprecated → the run
fails at once with the replacement named; the key's current credential deprecated → a rotation
to the replacement type is requested (on_deprecated_response); both live in worker/service/deprecation.py."""

from __future__ import annotations

from typing import Any

import pytest
from sqlmodel import Session, select

from tests.fakes_pipeline import FakeProvider, World
from worker.db.models import AuditEvent, ProviderRecord, RotationRun
from worker.protocol.states import RunState
from worker.db.session import session_scope
from worker.pipeline import steps
from worker.protocol import Step

SPEC = {"activation": {"poll_interval": "2s", "timeout": "60s"},
        "credential_types": {"api_key": {"replacement": "personal_access_token"}, "personal_access_token": {}}}


@pytest.fixture
def world(sqlite_url: str) -> World:
    from worker.runtime.broker import make_stub_broker, setup_broker

    setup_broker(broker=make_stub_broker())
    w = World(url=sqlite_url, provider=FakeProvider()).build()
    set_spec(w, SPEC)
    return w


def set_spec(world: World, spec: dict[str, Any]) -> None:
    with session_scope(world.engine) as session:
        record = session.get(ProviderRecord, world.provider.name)
        record.spec = spec
        session.add(record)


def runs(world: World) -> list[RotationRun]:
    with Session(world.engine) as session:
        return list(session.exec(select(RotationRun).order_by(RotationRun.created_at)).all())


def run_of(world: World, run_id: str) -> RotationRun:
    return next(r for r in runs(world) if r.id == run_id)


def queued_run_ids() -> list[str]:
    from dramatiq import Message, get_broker

    queue = get_broker().queues["rotation"].queue  # type: ignore[attr-defined]
    return [Message.decode(raw).args[0] for raw in list(queue)]


def follow_up(world: World, run_id: str) -> RotationRun:
    others = [r for r in runs(world) if r.id != run_id]
    assert len(others) == 1, f"expected one follow-up run, found {len(others)}"
    return others[0]


def test_new_credential_deprecated_at_precheck_fails_at_once_and_requests_the_replacement(world: World) -> None:
    run_id = world.request()
    assert steps.execute(world.ctx, Step.issue, run_id).step == Step.precheck
    world.provider.deprecated_types.add("api_key")  # the provider moved first: 434 for api_key
    checks_before = sum(1 for call, _ in world.provider.calls if call == "check")
    assert world.drive(run_id) == RunState.failed
    # No polling until the activation timeout, no retries: one check, then compensation.
    assert sum(1 for call, _ in world.provider.calls if call == "check") == checks_before + 1
    run = run_of(world, run_id)
    assert "deprecated" in run.last_error and "'personal_access_token'" in run.last_error
    new_key = world.provider.issued_secrets[0]
    assert not world.provider.is_valid(new_key)                # compensated: new key revoked
    assert world.vault_value() == world.old.secret             # old key still served
    # The key itself uses api_key, so once the failed run is over a rotation to the replacement follows.
    nxt = follow_up(world, run_id)
    assert nxt.state == RunState.requested and nxt.trigger == "deprecation"
    assert nxt.target_credential_type == "personal_access_token"
    assert nxt.id in queued_run_ids()  # enqueued after its transaction committed


def test_issue_refused_as_deprecated_names_the_replacement(world: World) -> None:
    world.provider.deprecated_types.add("api_key")
    run_id = world.request()
    assert world.drive(run_id) == RunState.failed
    run = run_of(world, run_id)
    assert "'personal_access_token'" in run.last_error and run.attempts == 0
    assert world.provider.issued_secrets == []
    nxt = follow_up(world, run_id)
    assert nxt.target_credential_type == "personal_access_token"
    # The follow-up issues the replacement type and completes; the key then uses it.
    assert world.drive(nxt.id) == RunState.completed
    with Session(world.engine) as session:
        from worker.db.models import ManagedKey

        assert session.get(ManagedKey, world.key.id).credential_type == "personal_access_token"


def test_replacement_also_deprecated_fails_without_a_loop(world: World) -> None:
    world.provider.deprecated_types.update({"api_key", "personal_access_token"})
    run_id = world.request(target_credential_type="personal_access_token")
    assert world.drive(run_id) == RunState.failed
    assert "personal_access_token" in run_of(world, run_id).last_error
    assert [r.id for r in runs(world)] == [run_id]  # stale for the key's type: no follow-up


def test_no_replacement_declared_says_what_to_do(world: World) -> None:
    set_spec(world, {"activation": {"poll_interval": "2s", "timeout": "60s"}, "credential_types": {"api_key": {}}})
    world.provider.deprecated_types.add("api_key")
    run_id = world.request()
    assert world.drive(run_id) == RunState.failed
    assert "no replacement type is declared" in run_of(world, run_id).last_error
    assert [r.id for r in runs(world)] == [run_id]


def test_new_credential_deprecated_at_verify_rolls_back_then_requests_replacement(world: World) -> None:
    run_id = world.request()
    world.drive(run_id, stop_at={RunState.propagated})
    world.provider.deprecated_types.add("api_key")
    assert world.drive(run_id) == RunState.rolled_back
    assert world.vault_value() == world.old.secret
    assert "'personal_access_token'" in run_of(world, run_id).last_error
    assert follow_up(world, run_id).target_credential_type == "personal_access_token"


def test_old_credential_deprecated_at_retire_reports_it(world: World) -> None:
    """Revoking the old key authenticates with it, and the provider rejects it as deprecated: the
    new key is served and verified, so the run completes (no needs_attention), and the deprecation
    is reported (it joins this run while it is open: idempotent, no second run)."""
    world.provider.deprecated_keys.add(world.old.key_id)
    world.provider.revoke_refused_deprecated.add(world.old.key_id)
    run_id = world.request()
    assert world.drive(run_id) == RunState.completed
    assert [r.id for r in runs(world)] == [run_id]
    with Session(world.engine) as session:
        events = session.exec(select(AuditEvent).where(AuditEvent.run_id == run_id)).all()
    joined = [e for e in events if e.event == "request_joined"]
    assert len(joined) == 1 and joined[0].detail["trigger"] == "deprecation" and joined[0].actor == "worker:test"
    retired = next(e for e in events if e.to_state == "retired")
    assert retired.detail["revocation"] == "rejected as deprecated by the provider"
    assert retired.detail["old_check"] == "deprecated"


def test_old_credential_check_deprecated_after_revoke_reports_it(world: World) -> None:
    world.provider.deprecated_keys.add(world.old.key_id)
    run_id = world.request()
    world.drive(run_id, stop_at={RunState.verified})
    world.clock.advance(3600)
    # Revocation works but leaves the key answering 434 (not 401) at the provider.
    original = world.provider.revoke

    def revoke_keeping_key(**kwargs: Any) -> None:
        original(**kwargs)
        world.provider.keys[world.old.key_id].valid = True

    world.provider.revoke = revoke_keeping_key  # type: ignore[method-assign]
    assert world.drive(run_id) == RunState.completed
    with Session(world.engine) as session:
        joined = session.exec(select(AuditEvent).where(AuditEvent.run_id == run_id,
                                                       AuditEvent.event == "request_joined")).all()
    assert len(joined) == 1


def test_deprecation_report_never_breaks_the_step(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    import worker.service.deprecation

    def broken(*_a: Any, **_k: Any) -> None:
        raise RuntimeError("database hiccup")

    monkeypatch.setattr(worker.service.deprecation, "on_deprecated_response", broken)
    world.provider.deprecated_keys.add(world.old.key_id)
    world.provider.revoke_refused_deprecated.add(world.old.key_id)
    run_id = world.request()
    assert world.drive(run_id) == RunState.completed
