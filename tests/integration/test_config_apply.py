"""`config apply`: idempotent sync of the inventory into SQLite and PostgreSQL, prune, dry run."""

from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import func
from sqlmodel import Session, select
from typer.testing import CliRunner

from worker.clock import as_utc
from worker.db.models import AuditEvent, InventorySnapshot, ManagedKey, ProviderRecord, RotationRun
from worker.protocol.states import RunState
from worker.db.session import make_engine, session_scope
from worker.inventory.apply import PruneBlocked, apply_inventory
from worker.inventory.schema import Inventory

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "keyrotor.example.yaml"
NOW = datetime(2026, 11, 1, tzinfo=timezone.utc)
ACTOR = "cli:tester"


@pytest.fixture
def doc() -> dict[str, Any]:
    return copy.deepcopy(yaml.safe_load(EXAMPLE.read_text()))


def apply(engine, data: dict[str, Any], **kwargs: Any):  # type: ignore[no-untyped-def]
    with session_scope(engine) as session:
        report = apply_inventory(session, Inventory.model_validate(data), actor=ACTOR, now=kwargs.pop("now", NOW), **kwargs)
        if kwargs.get("dry_run"):
            session.rollback()
    return report


def count(engine, model) -> int:  # type: ignore[no-untyped-def]
    with Session(engine) as session:
        return int(session.exec(select(func.count()).select_from(model)).one())


def events(engine) -> list[tuple[str, str, Any]]:  # type: ignore[no-untyped-def]
    with Session(engine) as session:
        return [(e.event, e.actor, e.detail) for e in session.exec(select(AuditEvent).order_by(AuditEvent.id)).all()]


def get_key(engine, name: str) -> ManagedKey:  # type: ignore[no-untyped-def]
    with Session(engine) as session:
        key = session.exec(select(ManagedKey).where(ManagedKey.name == name)).one()
        session.expunge(key)
        return key


def test_first_apply_creates_everything_then_reapply_changes_nothing(engine, doc) -> None:  # type: ignore[no-untyped-def]
    first = apply(engine, doc)
    assert first.counts() == {
        "provider": {"created": 4, "updated": 0, "unchanged": 0, "removed": 0},
        "integration": {"created": 4, "updated": 0, "unchanged": 0, "removed": 0},
        "key": {"created": 5, "updated": 0, "unchanged": 0, "removed": 0},
    }
    assert first.snapshot_stored and first.changed
    kinds = [e[0] for e in events(engine)]
    assert kinds.count("key_declared") == 5 and kinds[-1] == "inventory_applied"
    assert all(actor == ACTOR for _, actor, _ in events(engine))

    billing = get_key(engine, "alloy/billing")
    assert (billing.expiry_lead_time_s, billing.max_age_s, billing.grace_period_s) == (3 * 86400, 30 * 86400, 1800)
    assert billing.integrations == ["billing-app-copy", "billing-k8s"] and billing.vault_path == "apps/billing/alloy"
    assert (as_utc(billing.next_due_at), billing.due_reason) == (NOW + timedelta(days=30), "max_age")
    asana = get_key(engine, "asana/automation")
    assert (as_utc(asana.next_due_at), asana.due_reason) == (datetime(2017, 1, 1, tzinfo=timezone.utc) - timedelta(days=14), "deprecation")
    workfront = get_key(engine, "workfront/integration-user")
    assert (as_utc(workfront.next_due_at), workfront.due_reason) == (datetime(2026, 12, 13, tzinfo=timezone.utc), "expiry")

    with Session(engine) as session:
        alloy = session.get(ProviderRecord, "alloy")
        assert alloy is not None and alloy.mode == "overlap"
        assert alloy.spec["auth"]["token"]["vault"] == "secret/keyrotor/providers/alloy#admin_token"

    audit_before, snapshots_before = count(engine, AuditEvent), count(engine, InventorySnapshot)
    second = apply(engine, doc, now=NOW + timedelta(hours=5))
    assert not second.changed and not second.snapshot_stored
    assert second.counts()["key"] == {"created": 0, "updated": 0, "unchanged": 5, "removed": 0}
    assert "nothing changed" in second.summary_lines()[-1]
    assert (count(engine, AuditEvent), count(engine, InventorySnapshot)) == (audit_before, snapshots_before)


def test_changed_declaration_updates_and_is_audited(engine, doc) -> None:  # type: ignore[no-untyped-def]
    apply(engine, doc)
    doc["keys"]["alloy/billing"]["owner"] = "finance@example.com"
    doc["keys"]["alloy/billing"]["max_age"] = "10d"
    doc["providers"]["alloy"]["rate_limit"]["requests"] = 60
    report = apply(engine, doc)
    assert report.changes["key"]["updated"] == ["alloy/billing"]
    assert report.updated_fields["key:alloy/billing"] == ["max_age_s", "owner"]
    assert report.changes["provider"]["updated"] == ["alloy"]
    billing = get_key(engine, "alloy/billing")
    assert billing.owner == "finance@example.com"
    assert (as_utc(billing.next_due_at), billing.due_reason) == (NOW + timedelta(days=10), "max_age")
    updated = [d for e, _, d in events(engine) if e == "key_updated"]
    assert updated == [{"key": "alloy/billing", "changed": {
        "max_age_s": {"from": 30 * 86400, "to": 10 * 86400},
        "owner": {"from": "billing-team@example.com", "to": "finance@example.com"}}}]
    assert count(engine, InventorySnapshot) == 2


def test_values_moved_on_by_a_rotation_survive_reapply(engine, doc) -> None:  # type: ignore[no-untyped-def]
    apply(engine, doc)
    rotated_expiry = datetime(2027, 1, 20, tzinfo=timezone.utc)
    with session_scope(engine) as session:   # what a completed run does
        key = session.exec(select(ManagedKey).where(ManagedKey.name == "workfront/integration-user")).one()
        key.expires_at = rotated_expiry
        key.last_rotated_at = NOW
        session.add(key)
    report = apply(engine, doc)
    assert report.changes["key"]["updated"] == []
    assert as_utc(get_key(engine, "workfront/integration-user").expires_at) == rotated_expiry
    # A changed declaration does override it.
    doc["keys"]["workfront/integration-user"]["expires_at"] = "2027-03-01T00:00:00Z"
    report = apply(engine, doc)
    assert report.updated_fields["key:workfront/integration-user"] == ["expires_at"]
    assert as_utc(get_key(engine, "workfront/integration-user").expires_at) == datetime(2027, 3, 1, tzinfo=timezone.utc)


def test_nothing_is_removed_without_prune(engine, doc) -> None:  # type: ignore[no-untyped-def]
    apply(engine, doc)
    del doc["keys"]["alloy/billing"]
    del doc["integrations"]["billing-app-copy"]
    report = apply(engine, doc)
    assert report.would_prune == {"provider": [], "integration": ["billing-app-copy"], "key": ["alloy/billing"]}
    assert get_key(engine, "alloy/billing").name == "alloy/billing"
    assert any("--prune removes them: alloy/billing" in line for line in report.summary_lines())

    pruned = apply(engine, doc, prune=True)
    assert pruned.changes["key"]["removed"] == ["alloy/billing"]
    assert pruned.changes["integration"]["removed"] == ["billing-app-copy"]
    assert count(engine, ManagedKey) == 4
    assert [d for e, _, d in events(engine) if e == "key_removed"] == [{"key": "alloy/billing"}]


def test_prune_refuses_keys_with_an_open_run(engine, doc) -> None:  # type: ignore[no-untyped-def]
    apply(engine, doc)
    key = get_key(engine, "alloy/billing")
    with session_scope(engine) as session:
        session.add(RotationRun(id="run-open-1", key_id=key.id, state=RunState.promoted, trigger="manual",
                                requested_by="test", created_at=NOW))
    del doc["keys"]["alloy/billing"]
    audit_before = count(engine, AuditEvent)
    with pytest.raises(PruneBlocked) as info:
        apply(engine, doc, prune=True)
    assert "alloy/billing" in str(info.value)
    assert count(engine, ManagedKey) == 5 and count(engine, AuditEvent) == audit_before

    with session_scope(engine) as session:   # once the run has finished, the key (and its history) can go
        run = session.get(RotationRun, "run-open-1")
        run.state, run.finished_at = RunState.completed, NOW  # type: ignore[union-attr]
        session.add(run)
    assert apply(engine, doc, prune=True).changes["key"]["removed"] == ["alloy/billing"]
    assert count(engine, RotationRun) == 0


def test_prune_removes_an_undeclared_provider(engine, doc) -> None:  # type: ignore[no-untyped-def]
    apply(engine, doc)
    del doc["providers"]["workfront"]
    del doc["keys"]["workfront/integration-user"]
    report = apply(engine, doc, prune=True)
    assert report.changes["provider"]["removed"] == ["workfront"]
    with Session(engine) as session:
        assert session.get(ProviderRecord, "workfront") is None


def test_dry_run_writes_nothing(engine, doc) -> None:  # type: ignore[no-untyped-def]
    report = apply(engine, doc, dry_run=True)
    assert report.dry_run and report.counts()["key"]["created"] == 5
    assert (count(engine, ManagedKey), count(engine, ProviderRecord), count(engine, AuditEvent), count(engine, InventorySnapshot)) == (0, 0, 0, 0)


def test_cli_apply_on_a_fresh_sqlite_file(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from worker.cli import main as cli_main
    from worker.settings import get_settings

    url = f"sqlite:///{tmp_path}/fresh.db"   # not migrated: apply runs the migrations itself
    monkeypatch.setenv("KEYROTOR_DATABASE_URL", url)
    get_settings.cache_clear()
    cli_main._register()
    runner = CliRunner()
    try:
        first = runner.invoke(cli_main.app, ["config", "apply", str(EXAMPLE)])
        assert first.exit_code == 0, first.output
        assert "keys: 5 created" in first.output
        second = runner.invoke(cli_main.app, ["config", "apply", str(EXAMPLE)])
        assert second.exit_code == 0 and "nothing changed" in second.output
        bad = tmp_path / "bad.yaml"
        bad.write_text(EXAMPLE.read_text().replace("    provider: asana\n", "    provider: asanna\n"))
        refused = runner.invoke(cli_main.app, ["config", "apply", str(bad)])
        assert refused.exit_code == 2 and f"{bad}:" in refused.output and "not applied" in refused.output
    finally:
        get_settings.cache_clear()
    engine = make_engine(url)
    assert count(engine, ManagedKey) == 5
    engine.dispose()


def test_apply_refuses_literal_secrets_and_stores_nothing(pg_url, monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A literal token in a header, a ?api_token= query and a literal Slack webhook URL: `config
    apply` exits 2 naming each, and none of them reaches the provider or inventory_snapshot rows."""
    import sqlalchemy as sa

    from worker.cli import main as cli_main
    from worker.settings import get_settings

    token, query_token = "a9Fq2LmX7vR4kT8zW1pN6yB3", "Zp4Kq9Wm2Lx7Vr3Tn8Bc5Hd1"
    slack = "https://hooks.slack.com/services/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"
    data = yaml.safe_load(EXAMPLE.read_text())
    data["providers"]["alloy"]["calls"]["issue"]["headers"] = {"X-Api-Key": token}
    data["providers"]["alloy"]["calls"]["list"]["url"] = "{base_url}/api/api-key?api_token=" + query_token
    data["notifications"][0]["url"] = slack
    bad = tmp_path / "literal.yaml"
    bad.write_text(yaml.safe_dump(data, sort_keys=False))
    monkeypatch.setenv("KEYROTOR_DATABASE_URL", pg_url)
    get_settings.cache_clear()
    cli_main._register()
    try:
        result = CliRunner().invoke(cli_main.app, ["config", "apply", str(bad)])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2, result.output
    assert "not applied: 3 problems" in result.output
    assert "headers.X-Api-Key" in result.output and "calls.list.url" in result.output and "notifications[0].url" in result.output
    for value in (token, query_token, slack, "Qw3rTy8uIoP1aSdFgHjK2lZx"):
        assert value not in result.output
    engine = make_engine(pg_url)
    with engine.connect() as conn:
        stored = " ".join(repr(tuple(row)) for table in ("provider", "inventory_snapshot", "integration")
                          for row in conn.execute(sa.text(f'SELECT * FROM "{table}"')))
    engine.dispose()
    assert stored == "", stored  # nothing applied at all
