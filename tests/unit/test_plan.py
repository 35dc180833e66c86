"""`keyrotor plan`: what rotates when and why, incl. keys a person must rotate (SQLite)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from worker.service.plan import build_plan
from tests.scheduler_fakes import ALLOY_SPEC, ASANA_SPEC, add_key, add_provider
from worker.clock import set_clock
from worker.db.models import RotationRun
from worker.protocol.states import RunState
from worker.db.session import make_engine, session_scope

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def engine(sqlite_url: str):  # type: ignore[no-untyped-def]
    eng = make_engine(sqlite_url)
    set_clock(lambda: NOW)
    with session_scope(eng) as s:
        add_provider(s, "alloy", ALLOY_SPEC)
        add_provider(s, "asana", ASANA_SPEC)
        s.flush()
        add_key(s, "alloy/expiring", "alloy", next_due_at=NOW + timedelta(days=3), due_reason="expiry")
        add_key(s, "alloy/old", "alloy", next_due_at=NOW - timedelta(hours=2), due_reason="max_age")
        add_key(s, "alloy/later", "alloy", next_due_at=NOW + timedelta(days=60), due_reason="max_age")
        add_key(s, "alloy/off", "alloy", next_due_at=NOW, due_reason="expiry", enabled=False)
        add_key(s, "asana/automation", "asana", next_due_at=NOW - timedelta(days=3000), due_reason="deprecation")
        busy = add_key(s, "alloy/busy", "alloy", next_due_at=NOW + timedelta(days=1), due_reason="expiry")
        s.add(RotationRun(id="run-busy", key_id=busy.id, state=RunState.propagated.value, trigger="schedule",
                          requested_by="scheduler", created_at=NOW))
        graced = add_key(s, "alloy/graced", "alloy", next_due_at=NOW + timedelta(days=80), due_reason="max_age")
        s.add(RotationRun(id="run-grace", key_id=graced.id, state=RunState.verified.value, trigger="schedule",
                          requested_by="scheduler", created_at=NOW, grace_until=NOW + timedelta(minutes=30)))
    yield eng
    eng.dispose()


def test_plan_lists_due_keys_in_order_with_reasons(engine) -> None:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        items = build_plan(s, now=NOW, days=30)
    assert [i.key for i in items] == ["asana/automation", "alloy/old", "alloy/graced", "alloy/busy", "alloy/expiring"]
    by_key = {i.key: i for i in items}
    assert by_key["alloy/old"].reason == "max_age" and by_key["alloy/old"].overdue and by_key["alloy/old"].action == "rotate"
    assert by_key["alloy/expiring"].reason == "expiry" and not by_key["alloy/expiring"].overdue
    assert by_key["alloy/busy"].action == "in_progress" and by_key["alloy/busy"].run_state == "propagated"
    assert by_key["alloy/graced"].action == "retire" and by_key["alloy/graced"].run_id == "run-grace"


def test_deprecated_assisted_key_is_manual_and_migrates_to_the_replacement(engine) -> None:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        item = next(i for i in build_plan(s, now=NOW, days=30) if i.key == "asana/automation")
    assert item.reason == "deprecation"
    assert item.action == "manual" and item.automatic is False
    assert item.target_credential_type == "personal_access_token"
    assert "rejected" in item.note and "keyrotor deposit" in item.note


def test_days_widens_the_window(engine) -> None:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        assert "alloy/later" not in {i.key for i in build_plan(s, now=NOW, days=30)}
        assert "alloy/later" in {i.key for i in build_plan(s, now=NOW, days=61)}
        assert "alloy/off" not in {i.key for i in build_plan(s, now=NOW, days=61)}


def test_plan_command_json(engine, sqlite_url, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from worker.cli.main import main
    from worker.settings import get_settings

    monkeypatch.setenv("KEYROTOR_DATABASE_URL", sqlite_url)
    get_settings.cache_clear()
    try:
        assert main(["plan", "--days", "7", "--json"]) == 0
    finally:
        get_settings.cache_clear()
    doc = json.loads(capsys.readouterr().out)
    keys = [i["key"] for i in doc["items"]]
    assert keys == ["asana/automation", "alloy/old", "alloy/graced", "alloy/busy", "alloy/expiring"]
    assert doc["items"][0]["action"] == "manual" and doc["items"][0]["reason"] == "deprecation"


def test_plan_command_table(engine, sqlite_url, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from worker.cli.main import main
    from worker.settings import get_settings

    monkeypatch.setenv("KEYROTOR_DATABASE_URL", sqlite_url)
    get_settings.cache_clear()
    try:
        assert main(["plan"]) == 0
    finally:
        get_settings.cache_clear()
    out = capsys.readouterr().out
    assert "alloy/old" in out and "overdue" in out and "manual → personal_access_token" in out


def test_plan_and_status_say_what_is_left_for_a_provider_without_a_list_call(engine, sqlite_url, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """Without a list call, a key minted by an issue call whose answer was lost cannot be found:
    plan and status say so instead of implying the orphan scan covers it."""
    import copy

    from worker.cli.main import main
    from worker.settings import get_settings

    seeing = copy.deepcopy(ALLOY_SPEC)  # ALLOY_SPEC declares no list call; this one does
    seeing["calls"]["list"] = {"method": "GET", "url": "{base_url}/api/api-key",
                               "response": {"items": "$.keys", "key_id": "$.id", "name": "$.name"}}
    with session_scope(engine) as s:
        add_provider(s, "seeing", seeing)
        s.flush()
        add_key(s, "seeing/key", "seeing", next_due_at=NOW + timedelta(days=1), due_reason="expiry")
    with session_scope(engine) as s:
        items = {i.key: i for i in build_plan(s, now=NOW, days=30)}
    assert "no orphan scan (the provider has no list call)" in items["alloy/expiring"].note
    assert "orphan scan" not in items["seeing/key"].note
    monkeypatch.setenv("KEYROTOR_DATABASE_URL", sqlite_url)
    get_settings.cache_clear()
    try:
        assert main(["status", "--json"]) == 0
        rows = {r["key"]: r for r in json.loads(capsys.readouterr().out)["keys"]}
        assert "issue_outcome_unknown" in rows["alloy/expiring"]["orphan_guard"]
        assert rows["seeing/key"]["orphan_guard"] is None
        assert main(["status"]) == 0
        out = capsys.readouterr().out
        assert "provider alloy: no orphan scan" in out and "provider seeing:" not in out
    finally:
        get_settings.cache_clear()


def test_plan_and_status_mark_keys_carrying_admin_rights(engine, sqlite_url, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """A credential type declared ``admin: true`` (a Workfront administrator's key) is shown as
    such in plan and status; other keys are not."""
    import copy

    from worker.cli.main import main
    from worker.settings import get_settings

    spec = copy.deepcopy(ALLOY_SPEC)
    spec["credential_types"] = {"user_api_key": {"lifetime": 30 * 86400}, "admin_api_key": {"lifetime": 30 * 86400, "admin": True}}
    with session_scope(engine) as s:
        add_provider(s, "wf", spec)
        s.flush()
        add_key(s, "wf/admin", "wf", credential_type="admin_api_key", next_due_at=NOW + timedelta(days=2), due_reason="expiry")
        add_key(s, "wf/user", "wf", credential_type="user_api_key", next_due_at=NOW + timedelta(days=2), due_reason="expiry")
    with session_scope(engine) as s:
        items = {i.key: i for i in build_plan(s, now=NOW, days=30)}
    assert items["wf/admin"].admin is True and items["wf/user"].admin is False and items["alloy/expiring"].admin is False
    monkeypatch.setenv("KEYROTOR_DATABASE_URL", sqlite_url)
    get_settings.cache_clear()
    try:
        assert main(["plan"]) == 0
        out = capsys.readouterr().out
        assert "wf/admin [admin]" in out and "wf/user [admin]" not in out
        assert main(["status", "--json"]) == 0
        rows = {r["key"]: r for r in json.loads(capsys.readouterr().out)["keys"]}
        assert rows["wf/admin"]["admin"] is True and rows["wf/user"]["admin"] is False
        assert main(["status"]) == 0
        out = capsys.readouterr().out
        assert "wf/admin [admin]" in out and "wf/user [admin]" not in out
        assert "carry administrator rights" in out
    finally:
        get_settings.cache_clear()
