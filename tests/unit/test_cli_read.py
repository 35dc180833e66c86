"""`keyrotor status / history / runs`: tables, JSON, exit codes, on a seeded SQLite database."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from worker.cli.main import main
from worker.clock import set_clock
from worker.db.migrate import upgrade
from worker.db.models import AuditEvent, KeyVersion, ManagedKey, ProviderRecord, RotationRun, VersionStage
from worker.protocol.states import RunState
from worker.db.session import make_engine, session_scope
from worker.settings import get_settings

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)


@pytest.fixture
def db(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path}/cli.db"
    monkeypatch.setenv("KEYROTOR_DATABASE_URL", url)
    get_settings.cache_clear()
    upgrade(url)
    set_clock(lambda: NOW)
    engine = make_engine(url)
    with session_scope(engine) as s:
        s.add(ProviderRecord(name="alloy", kind="http", mode="overlap", spec={}))
        s.flush()
        a = ManagedKey(name="alloy/reporting", provider="alloy", credential_type="api_key", owner="o",
                       vault_path="apps/reporting", next_due_at=NOW + timedelta(days=3), due_reason="max_age",
                       expires_at=NOW + timedelta(days=10))
        b = ManagedKey(name="alloy/billing", provider="alloy", credential_type="api_key", owner="o", vault_path="apps/billing")
        s.add(a)
        s.add(b)
        s.flush()
        old = KeyVersion(key_id=a.id, credential_type="api_key", stage=VersionStage.previous, fingerprint="sha256:aaaaaaaa11111111",
                         provider_key_id="k-old")
        new = KeyVersion(key_id=a.id, credential_type="api_key", stage=VersionStage.current, fingerprint="sha256:bbbbbbbb22222222",
                         provider_key_id="k-new", run_id="run-2")
        s.add(old)
        s.add(new)
        s.flush()
        s.add(RotationRun(id="run-1", key_id=a.id, state=RunState.rolled_back, trigger="manual", reason="manual",
                          requested_by="cli:alice", created_at=NOW - timedelta(days=2),
                          finished_at=NOW - timedelta(days=2) + timedelta(seconds=42), last_error="verification failed at consumer"))
        s.add(RotationRun(id="run-2", key_id=a.id, state=RunState.verified, trigger="schedule", reason="max_age",
                          requested_by="scheduler", created_at=NOW - timedelta(hours=1), updated_at=NOW - timedelta(minutes=5)))
        s.add(RotationRun(id="run-3", key_id=b.id, state=RunState.needs_attention, trigger="schedule", reason="expiry",
                          requested_by="scheduler", created_at=NOW - timedelta(minutes=30)))
        s.flush()
        for i, (frm, to) in enumerate([(None, "requested"), ("requested", "issued"), ("issued", "prechecked")]):
            s.add(AuditEvent(at=NOW - timedelta(hours=1) + timedelta(seconds=i), run_id="run-2", key_id=a.id, actor="worker:h1",
                             event="state_changed", from_state=frm, to_state=to, detail={"fingerprint": "sha256:bbbbbbbb22222222"}))
    engine.dispose()
    yield url
    get_settings.cache_clear()


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_status_table_shows_stage_due_and_last_run(db, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run_cli(capsys, "status")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["KEY", "PROVIDER", "STAGE"]
    reporting = next(line for line in lines if line.startswith("alloy/reporting"))
    assert "verified" in reporting and "bbbbbbbb" in reporting and "in 3d (max_age)" in reporting and "run-2" in reporting
    billing = next(line for line in lines if line.startswith("alloy/billing"))
    assert "needs_attention" in billing and "unseeded" not in billing


def test_status_json_is_one_document(db, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run_cli(capsys, "status", "--json")
    assert code == 0
    doc = json.loads(out)
    keys = {k["key"]: k for k in doc["keys"]}
    assert set(keys) == {"alloy/reporting", "alloy/billing"}
    rep = keys["alloy/reporting"]
    assert rep["stage"] == "verified"
    assert rep["current_fingerprint"] == "sha256:bbbbbbbb22222222"
    assert rep["previous_fingerprint"] == "sha256:aaaaaaaa11111111"
    assert rep["next_due_at"] == "2026-03-04T12:00:00Z"
    assert rep["last_run"]["id"] == "run-2" and rep["last_run"]["state"] == "verified"


def test_history_lists_runs_events_and_versions(db, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run_cli(capsys, "history", "alloy/reporting", "--json")
    assert code == 0
    doc = json.loads(out)
    assert [r["id"] for r in doc["runs"]] == ["run-2", "run-1"]  # newest first
    assert [e["to_state"] for e in doc["events"]] == ["requested", "issued", "prechecked"]  # in order
    assert doc["runs"][1]["duration_s"] == 42
    assert {v["stage"] for v in doc["versions"]} == {"current", "previous"}
    code, out, _ = run_cli(capsys, "history", "alloy/reporting")
    assert code == 0
    assert "requested → issued" in out and "rolled_back" in out and "verification failed" in out


def test_unknown_key_is_a_usage_error_without_traceback(db, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run_cli(capsys, "history", "nope/missing")
    assert code == 2
    assert out == ""
    assert "no managed key named 'nope/missing'; see `keyrotor status`" in err
    assert "Traceback" not in err


def test_runs_filters_by_state(db, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run_cli(capsys, "runs", "--state", "needs_attention", "--json")
    assert code == 0
    assert [r["id"] for r in json.loads(out)["runs"]] == ["run-3"]
    code, out, _ = run_cli(capsys, "runs", "--state", "open", "--json")
    assert {r["id"] for r in json.loads(out)["runs"]} == {"run-2", "run-3"}
    code, out, _ = run_cli(capsys, "runs", "--state", "terminal", "--json")
    assert [r["id"] for r in json.loads(out)["runs"]] == ["run-1"]
    code, out, _ = run_cli(capsys, "runs", "--key", "alloy/billing")
    assert code == 0 and "run-3" in out and "run-1" not in out


def test_runs_rejects_unknown_state(db, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run_cli(capsys, "runs", "--state", "exploded")
    assert code == 2
    assert "unknown state 'exploded'" in err and "needs_attention" in err


def test_status_on_an_empty_database_says_what_to_do(tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "fresh.db").touch()  # an empty file, not migrated: status migrates (a missing one is refused)
    monkeypatch.setenv("KEYROTOR_DATABASE_URL", f"sqlite:///{tmp_path}/fresh.db")
    get_settings.cache_clear()
    try:
        code, out, _ = run_cli(capsys, "status")
    finally:
        get_settings.cache_clear()
    assert code == 0
    assert "keyrotor config apply" in out


def test_relative_and_iso_formatting() -> None:
    from worker.cli.output import duration, iso, relative

    assert relative(NOW + timedelta(days=3, hours=2), NOW) == "in 3d"
    assert relative(NOW - timedelta(minutes=5), NOW) == "5m ago"
    assert relative(NOW, NOW) == "now"
    assert iso(datetime(2026, 1, 2, 3, 4, 5, 678)) == "2026-01-02T03:04:05Z"
    assert duration(3.25) == "3.2s" and duration(185) == "3m05s"
