"""`keyrotor resolve`: list the ways out of needs_attention, refuse the unsafe ones, apply one."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from sqlmodel import select

from worker.cli.main import main
from worker.db.migrate import upgrade
from worker.db.models import AuditEvent, ManagedKey, ProviderRecord, RotationRun
from worker.protocol.states import RunState
from worker.db.session import make_engine, session_scope
from worker.settings import get_settings

pytestmark = pytest.mark.integration


@pytest.fixture
def stuck_run(tmp_path, monkeypatch, redis_url, redis_namespace, vault):  # type: ignore[no-untyped-def]
    """A run that ran out of retries while requested: nothing was issued, the old key is untouched.

    Resolving reads Vault's staging area (a crashed issue step may have staged a key it never
    recorded), so the command gets the suite's OpenBao server (or the Vault VAULT_ADDR names).
    """
    monkeypatch.setenv("VAULT_ADDR", vault.addr)
    monkeypatch.setenv("VAULT_TOKEN", vault.token)
    url = f"sqlite:///{tmp_path}/resolve.db"
    monkeypatch.setenv("KEYROTOR_DATABASE_URL", url)
    monkeypatch.setenv("KEYROTOR_REDIS_URL", redis_url)
    monkeypatch.setenv("KEYROTOR_QUEUE_NAMESPACE", redis_namespace)
    get_settings.cache_clear()
    upgrade(url)
    engine = make_engine(url)
    now = datetime.now(timezone.utc)
    with session_scope(engine) as s:
        s.add(ProviderRecord(name="alloy", kind="http", spec={}))
        s.flush()
        s.add(ManagedKey(name="alloy/a", provider="alloy", credential_type="api_key", owner="o", vault_path="a"))
        s.flush()
        s.add(RotationRun(id="r1", key_id=1, state=RunState.needs_attention, trigger="manual", requested_by="cli:t",
                          created_at=now, last_error="TransientError: provider down"))
        s.add(AuditEvent(at=now, run_id="r1", key_id=1, actor="worker:t", event="state_changed",
                         from_state="requested", to_state="needs_attention", detail={}))
    yield engine
    engine.dispose()
    get_settings.cache_clear()


def test_lists_allowed_actions(stuck_run, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["resolve", "r1", "--json"]) == 0
    allowed = json.loads(capsys.readouterr().out)["allowed"]
    assert allowed.get("retry") == "requested" and allowed.get("cancel") == "cancelled"
    assert "rollback" not in allowed  # nothing was promoted, so there is nothing to roll back


def test_refuses_an_action_the_run_does_not_allow(stuck_run, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["resolve", "r1", "--action", "rollback"]) == 2
    err = capsys.readouterr().err
    assert "cannot rollback" in err and "retry" in err and "Traceback" not in err
    with session_scope(stuck_run) as s:
        assert s.get(RotationRun, "r1").state == RunState.needs_attention


def test_cancel_ends_the_run_and_audits_the_operator(stuck_run, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["resolve", "r1", "--action", "cancel", "--note", "provider retired"]) == 0
    assert "cancel → cancelled" in capsys.readouterr().out
    with session_scope(stuck_run) as s:
        run = s.get(RotationRun, "r1")
        assert run.state == RunState.cancelled and run.finished_at is not None
        last = s.exec(select(AuditEvent).where(AuditEvent.run_id == "r1").order_by(AuditEvent.id.desc())).first()
        assert last.to_state == "cancelled" and last.actor.startswith("cli:")
    # A finished run has nothing left to resolve.
    assert main(["resolve", "r1", "--action", "retry"]) == 2


def test_revoked_by_person_completes_a_run_stuck_retiring(stuck_run, capsys) -> None:  # type: ignore[no-untyped-def]
    """The old key could not be revoked (no provider key id): a person revoked it at the provider,
    says so, and the run completes with the old version recorded as retired."""
    from worker.db.models import KeyVersion, VersionStage

    now = datetime.now(timezone.utc)
    with session_scope(stuck_run) as s:
        s.add(ManagedKey(name="alloy/b", provider="alloy", credential_type="api_key", owner="o", vault_path="b"))
        s.flush()
        old = KeyVersion(key_id=2, credential_type="api_key", stage=VersionStage.current, fingerprint="fp-old")
        s.add(old)
        s.flush()
        s.add(RotationRun(id="r2", key_id=2, state=RunState.needs_attention, trigger="manual", requested_by="cli:t",
                          created_at=now, old_version_id=old.id,
                          last_error="revoke: template '{base_url}/api/api-key/{key_id}': {key_id} has no value"))
        s.add(AuditEvent(at=now, run_id="r2", key_id=2, actor="worker:t", event="state_changed",
                         from_state="verified", to_state="needs_attention", detail={}))
    assert main(["resolve", "r2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["allowed"].get("revoked-by-person") == "retired"
    assert main(["resolve", "r1", "--action", "revoked-by-person"]) == 2  # r1 stopped before anything was issued
    capsys.readouterr()
    assert main(["resolve", "r2", "--action", "revoked-by-person", "--note", "deleted in the console"]) == 0
    with session_scope(stuck_run) as s:
        run = s.get(RotationRun, "r2")
        assert run.state == RunState.retired and run.last_error is None
        assert s.get(KeyVersion, run.old_version_id).stage == VersionStage.retired.value
        event = s.exec(select(AuditEvent).where(AuditEvent.run_id == "r2", AuditEvent.to_state == "retired")).one()
        assert event.detail["revocation"] == "revoked_by_person" and event.actor.startswith("cli:")


def test_cancel_is_resolve_cancel_and_takes_a_run_id_prefix(stuck_run, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["cancel", "r", "--note", "not needed", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"run_id": "r1", "action": "cancel", "state": "cancelled"}
    with session_scope(stuck_run) as s:
        assert s.get(RotationRun, "r1").state == RunState.cancelled
    assert main(["cancel", "r1"]) == 2  # nothing left to cancel: refused like resolve --action cancel
    assert "not needs_attention" in capsys.readouterr().err
