"""The last applied inventory document (``inventory_snapshot``), for the parts of a key's
declaration that have no column: its owner's contact and its assisted-mode timings, and the
notification sinks."""

from __future__ import annotations

import json
from typing import Any

from worker.log import get_logger
from worker.inventory.schema import AssistedSpec

log = get_logger(__name__)


def applied_document(engine: Any) -> dict[str, Any]:
    """The newest applied document, ``{}`` when none was applied or the table cannot be read."""
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    try:
        with engine.connect() as conn:
            row = conn.execute(text("SELECT document FROM inventory_snapshot ORDER BY id DESC LIMIT 1")).first()
    except DBAPIError as exc:  # table missing (migration 0002 not applied) or DB down
        log.warning("inventory_snapshot_unavailable", error=type(exc).__name__)
        return {}
    if row is None:
        return {}
    document = row[0]
    if isinstance(document, str):
        document = json.loads(document)
    return document if isinstance(document, dict) else {}


def assisted_timings(document: dict[str, Any], key_name: str) -> Any:
    """The key's ``AssistedSpec`` (defaults when the key or the section is absent)."""
    raw = ((document.get("keys") or {}).get(key_name) or {}).get("assisted") or {}
    return AssistedSpec.model_validate(raw)


def create_url(document: dict[str, Any], provider: str, credential_type: str) -> str | None:
    """Where a person creates ``credential_type`` at ``provider`` (its ``create_url``), if declared."""
    types = ((document.get("providers") or {}).get(provider) or {}).get("credential_types") or {}
    value = (types.get(credential_type) or {}).get("create_url")
    return value if isinstance(value, str) else None
