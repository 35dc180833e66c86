"""A notice for one key reads that key's settings by key, not the whole applied inventory.

``config apply`` copies each key's contact and assisted timings to its ``managed_key`` row and the
document's notifications/owner_delivery to the snapshot's ``settings`` (migration 0005);
``document_for`` reads them. Same answers as the whole document, after every re-apply, and the
same statements (none reading the document) at 10 keys as at 1,000. SQLite and PostgreSQL.
"""

from __future__ import annotations

import copy
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from sqlalchemy import event

from worker.db.migrate import upgrade
from worker.db.session import make_engine, session_scope
from worker.inventory.apply import apply_inventory
from worker.inventory.schema import Inventory
from worker.inventory.snapshot import applied_document, assisted_timings, create_url, document_for
from worker.notify import snapshot_notifications
from worker.owner_notices import contact_of

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "keyrotor.example.yaml"
NOW = datetime(2026, 11, 1, tzinfo=timezone.utc)
KEY = "asana/automation"


@pytest.fixture
def doc() -> dict[str, Any]:
    return copy.deepcopy(yaml.safe_load(EXAMPLE.read_text()))


def _apply(engine: Any, data: dict[str, Any]) -> None:
    with session_scope(engine) as session:
        apply_inventory(session, Inventory.model_validate(data), actor="cli:test", now=NOW)


def _agrees_with_the_whole_document(engine: Any) -> None:
    whole = applied_document(engine)
    for name, declared in whole["keys"].items():
        part = document_for(engine, [name], [declared["provider"]])
        assert contact_of(part, name) == contact_of(whole, name)
        assert assisted_timings(part, name) == assisted_timings(whole, name)
        assert create_url(part, declared["provider"], declared["credential_type"]) == \
            create_url(whole, declared["provider"], declared["credential_type"])
        assert part["owner_delivery"] == whole.get("owner_delivery")
    assert snapshot_notifications(engine) == list(whole.get("notifications") or [])


def test_the_lookup_follows_every_apply(engine, doc) -> None:  # type: ignore[no-untyped-def]
    _apply(engine, doc)
    _agrees_with_the_whole_document(engine)
    assert contact_of(document_for(engine, [KEY]), KEY) is not None

    doc["keys"][KEY]["contact"] = {"email": "ops@example.com"}
    doc["keys"][KEY]["assisted"] = {"deposit_deadline": "2d"}
    doc["keys"]["alloy/reporting"]["contact"] = {"slack": "#data"}
    doc["notifications"] = doc["notifications"][:1]
    _apply(engine, doc)
    _agrees_with_the_whole_document(engine)
    assert assisted_timings(document_for(engine, [KEY]), KEY).deposit_deadline.days == 2

    del doc["keys"][KEY]["contact"], doc["keys"][KEY]["assisted"]
    _apply(engine, doc)
    _agrees_with_the_whole_document(engine)
    assert contact_of(document_for(engine, [KEY]), KEY) is None


def _with_keys(doc: dict[str, Any], count: int) -> dict[str, Any]:
    data = copy.deepcopy(doc)
    template = data["keys"][KEY]
    for i in range(count):
        copy_ = copy.deepcopy(template)
        copy_["vault"] = dict(copy_["vault"], path=f"apps/many/{i}")
        copy_["contact"] = {"email": f"owner{i}@example.com"}
        data["keys"][f"many/{i:05d}"] = copy_
    return data


def _lookup_statements(url: str, doc: dict[str, Any], count: int) -> list[str]:
    engine = make_engine(url)
    try:
        _apply(engine, _with_keys(doc, count))
        seen: list[str] = []

        def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            seen.append(statement)

        event.listen(engine, "before_cursor_execute", record)
        part = document_for(engine, ["many/00007"], ["asana"])
        notifications = snapshot_notifications(engine)
        event.remove(engine, "before_cursor_execute", record)
        assert contact_of(part, "many/00007") == "email owner7@example.com"
        assert len(notifications) == 2
        return seen
    finally:
        engine.dispose()


def test_a_lookup_costs_the_same_at_10_and_1000_keys(db_url, doc) -> None:  # type: ignore[no-untyped-def]
    """The same few statements, none of which reads the document (whose size follows the inventory)."""
    small = _lookup_statements(db_url, doc, 10)
    large = _lookup_statements(db_url, doc, 1000)  # the same database, re-applied with 1,000 keys
    assert small == large and len(small) <= 4, small
    assert not any("document" in statement for statement in small), small


def test_the_migration_fills_the_columns_from_the_applied_document(doc, tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path}/old.db"
    upgrade(url, "0004")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:  # what an older `config apply` left
            whole = Inventory.model_validate(doc).model_dump(mode="json", by_alias=True)
            conn.execute(sa.text("INSERT INTO provider (name, kind, mode, spec, updated_at) "
                                 "VALUES ('asana', 'http', 'assisted', '{}', :now)"), {"now": NOW})
            conn.execute(sa.text(
                "INSERT INTO managed_key (name, provider, credential_type, owner, vault_mount, vault_path, vault_field, "
                "expiry_lead_time_s, grace_period_s, integrations, labels, enabled, created_at, updated_at) VALUES "
                "(:name, 'asana', 'api_key', 'o', 'secret', 'p', 'f', 0, 0, '[]', '{}', 1, :now, :now)"),
                {"name": KEY, "now": NOW})
            conn.execute(sa.text("INSERT INTO inventory_snapshot (applied_at, applied_by, digest, document) "
                                 "VALUES (:now, 'cli:old', 'x', :document)"),
                         {"now": NOW, "document": json.dumps(whole)})
        upgrade(url)
        part = document_for(engine, [KEY])
        assert part["keys"][KEY] == {"contact": whole["keys"][KEY]["contact"], "assisted": whole["keys"][KEY]["assisted"]}
        assert part["owner_delivery"] == whole["owner_delivery"]
        assert snapshot_notifications(engine) == whole["notifications"]
    finally:
        engine.dispose()
