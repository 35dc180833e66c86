"""Which credential type a rotation issues, from every trigger: ``rotate --to TYPE``, and a
deprecated type moving to its replacement by itself (manual, emergency, queue)."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from worker.cli.main import main
from worker.db.migrate import upgrade
from worker.db.models import ManagedKey, ProviderRecord, RotationRun
from worker.db.session import make_engine, session_scope
from worker.pipeline.requests import request_rotation
from worker.pipeline.targets import UnknownTargetType, rejected_at, rotation_target
from worker.settings import get_settings

NOW = datetime(2026, 6, 1, tzinfo=timezone.utc)
ASANA = {"credential_types": {
    "api_key": {"replacement": "personal_access_token", "deprecation": [
        {"phase": "no_new_credentials", "from": "2016-01-01T00:00:00Z"},
        {"phase": "amnesty", "from": "2017-01-01T00:00:00Z", "headers": {"Asana-Amnesty-Api-Key": "true"}},
        {"phase": "rejected", "from": "2017-02-01T00:00:00Z"}]},
    "personal_access_token": {},
    "old_pat": {"replacement": "api_key", "deprecation": [{"phase": "no_new_credentials", "from": "2020-01-01T00:00:00Z"}]},
    "future": {"replacement": "personal_access_token", "deprecation": [{"phase": "no_new_credentials", "from": "2030-01-01T00:00:00Z"}]},
}}


def target(current: str, requested: str | None = None, when: datetime = NOW) -> str | None:
    return rotation_target(provider="asana", provider_spec=ASANA, current_type=current, requested=requested, now=when)


def test_a_deprecated_type_moves_to_its_replacement_by_itself() -> None:
    assert target("api_key") == "personal_access_token"
    assert target("api_key", when=datetime(2015, 9, 1, tzinfo=timezone.utc)) is None   # before the timeline
    assert target("old_pat") == "personal_access_token"                                # a chain: old_pat → api_key → PAT
    assert target("personal_access_token") is None and target("future") is None


def test_an_explicit_type_is_checked() -> None:
    assert target("future", "personal_access_token") == "personal_access_token"
    assert target("personal_access_token", "personal_access_token") is None
    with pytest.raises(UnknownTargetType, match=r"no credential type 'pat' \(known: api_key, future, old_pat, personal_access_token\)"):
        target("api_key", "pat")
    with pytest.raises(UnknownTargetType, match=r"no longer issues 'api_key'.*rotated?.*'personal_access_token' instead"):
        target("personal_access_token", "api_key")


def test_rejected_only_once_the_rejected_phase_has_started() -> None:
    assert rejected_at(ASANA, "api_key", NOW)
    assert not rejected_at(ASANA, "api_key", datetime(2017, 1, 15, tzinfo=timezone.utc))   # amnesty
    assert not rejected_at(ASANA, "old_pat", NOW) and not rejected_at(ASANA, "personal_access_token", NOW)
    assert not rejected_at(ASANA, "unknown", NOW) and not rejected_at(None, "api_key", NOW)


@pytest.fixture
def engine(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path}/targets.db"
    monkeypatch.setenv("KEYROTOR_DATABASE_URL", url)
    get_settings.cache_clear()
    upgrade(url)
    eng = make_engine(url)
    with session_scope(eng) as s:
        s.add(ProviderRecord(name="asana", kind="http", mode="assisted", spec=ASANA))
        s.flush()
        s.add(ManagedKey(name="asana/a", provider="asana", credential_type="api_key", owner="o", vault_path="a"))
        s.add(ManagedKey(name="asana/b", provider="asana", credential_type="future", owner="o", vault_path="b"))
    yield eng
    eng.dispose()
    get_settings.cache_clear()


@pytest.mark.parametrize("trigger, emergency", [("manual", False), ("emergency", True), ("queue", False)])
def test_every_trigger_of_a_deprecated_key_targets_the_replacement(engine, trigger, emergency) -> None:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        run, created = request_rotation(s, key_name="asana/a", reason="manual", trigger=trigger,
                                        requested_by="test", emergency=emergency)
        assert created and run.target_credential_type == "personal_access_token"


def test_rotate_to_names_the_type_and_refuses_unknown_ones(engine, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from worker.runtime import broker as broker_mod

    stub = broker_mod.make_stub_broker()
    original_setup = broker_mod.setup_broker
    monkeypatch.setattr("worker.cli.act_cmds._require_redis", lambda url: None)
    monkeypatch.setattr(broker_mod, "setup_broker", lambda settings=None, broker=None: original_setup(broker=stub))
    try:
        assert main(["rotate", "asana/b", "--to", "nope"]) == 2
        err = capsys.readouterr().err
        assert "--to nope: provider 'asana' has no credential type 'nope'" in err and "Traceback" not in err
        assert main(["rotate", "asana/b", "--to", "api_key"]) == 2
        assert "no longer issues 'api_key'" in capsys.readouterr().err
        assert main(["rotate", "--provider", "asana", "--all", "--emergency", "--to", "x"]) == 2
        assert "--to names the credential type of one key" in capsys.readouterr().err
        with session_scope(engine) as s:
            assert s.exec(__import__("sqlmodel").select(RotationRun)).all() == []   # nothing recorded
        assert main(["rotate", "asana/b", "--to", "personal_access_token", "--dry-run"]) == 0
        assert "type future → personal_access_token" in capsys.readouterr().out
        assert main(["rotate", "asana/b", "--to", "personal_access_token", "--json"]) == 0
        run_id = json.loads(capsys.readouterr().out)["runs"][0]["run_id"]
        with session_scope(engine) as s:
            assert s.get(RotationRun, run_id).target_credential_type == "personal_access_token"
        assert main(["rotate", "asana/a", "--json"]) == 0          # deprecated: moves by itself
        run_id = json.loads(capsys.readouterr().out)["runs"][0]["run_id"]
        with session_scope(engine) as s:
            assert s.get(RotationRun, run_id).target_credential_type == "personal_access_token"
    finally:
        broker_mod.reset_broker()


def test_an_owners_reminder_names_the_type_the_run_will_ask_for(engine) -> None:  # type: ignore[no-untyped-def]
    from worker.service.due import refresh_next_due
    from worker.service.reminders import send_reminders

    with session_scope(engine) as s:
        for key in s.exec(__import__("sqlmodel").select(ManagedKey)).all():
            refresh_next_due(s, key)
    sent: list[tuple[str, dict]] = []
    send_reminders(engine, now=NOW, notify=lambda event, *, key_name, run_id, detail: sent.append((key_name, detail)))
    detail = dict(sent)["asana/a"]
    assert detail["credential_type"] == "api_key" and detail["target_credential_type"] == "personal_access_token"
    assert "create a new personal_access_token" in detail["action"]
