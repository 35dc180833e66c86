"""The last applied inventory document (``inventory_snapshot``), for the parts of a key's
declaration that have no column of their own in the pipeline's queries: its owner's contact and
its assisted-mode timings, the providers' ``create_url``, and the notification settings.

A step needs them for one key; reading and parsing the whole document for that cost O(inventory)
per rotation (seconds at 100k keys). ``document_for`` reads only what the named keys need, by
key: the contact and timings ``config apply`` copies to their ``managed_key`` row (migration
0005), the providers' rows, and the small ``settings`` of the newest snapshot (its
``notifications`` and ``owner_delivery``). It returns them in the document's own shape, so the
readers below work on either.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

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


#: The document's sections copied to ``inventory_snapshot.settings`` (size independent of the keys).
SETTINGS_SECTIONS = ("notifications", "owner_delivery")
#: The parts of a key's declaration copied to its ``managed_key`` row.
KEY_NOTICE_FIELDS = ("contact", "assisted")


def snapshot_settings(document: dict[str, Any]) -> dict[str, Any]:
    """What ``inventory_snapshot.settings`` holds for ``document``."""
    return {section: document.get(section) for section in SETTINGS_SECTIONS}


def key_notice(declared: dict[str, Any]) -> dict[str, Any]:
    """The ``managed_key`` columns that hold a key's declared contact and assisted timings."""
    return {name: declared.get(name) for name in KEY_NOTICE_FIELDS}


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def document_for(engine: Any, key_names: Iterable[str], providers: Iterable[str] = ()) -> dict[str, Any]:
    """The applied document's parts for ``key_names`` (contact, assisted) and ``providers`` (their
    spec), with its ``settings`` sections: a few indexed reads, whatever the inventory's size.
    ``{}`` parts when nothing was applied or the tables cannot be read."""
    from sqlalchemy import bindparam, text
    from sqlalchemy.exc import DBAPIError

    names, provider_names = sorted(set(key_names)), sorted(set(providers))
    document: dict[str, Any] = {"keys": {}, "providers": {}}
    try:
        with engine.connect() as conn:
            if names:
                rows = conn.execute(text("SELECT name, contact, assisted FROM managed_key WHERE name IN :names")
                                    .bindparams(bindparam("names", expanding=True)), {"names": names})
                document["keys"] = {name: {"contact": _json(contact), "assisted": _json(assisted)}
                                    for name, contact, assisted in rows}
            if provider_names:
                rows = conn.execute(text("SELECT name, spec FROM provider WHERE name IN :names")
                                    .bindparams(bindparam("names", expanding=True)), {"names": provider_names})
                document["providers"] = {name: _json(spec) for name, spec in rows}
            row = conn.execute(text("SELECT settings FROM inventory_snapshot ORDER BY id DESC LIMIT 1")).first()
    except DBAPIError as exc:  # tables missing (an older schema) or DB down
        log.warning("inventory_snapshot_unavailable", error=type(exc).__name__)
        return document
    settings = _json(row[0]) if row is not None else {}
    if row is not None and settings is None:  # a snapshot stored by an older version: read it whole, once
        settings = snapshot_settings(applied_document(engine))
    document.update({k: v for k, v in (settings or {}).items() if k in SETTINGS_SECTIONS})
    return document


def applied_settings(engine: Any) -> dict[str, Any]:
    """The newest snapshot's ``notifications`` and ``owner_delivery`` (not the keys)."""
    return {k: v for k, v in document_for(engine, ()).items() if k in SETTINGS_SECTIONS}


def assisted_timings(document: dict[str, Any], key_name: str) -> Any:
    """The key's ``AssistedSpec`` (defaults when the key or the section is absent)."""
    raw = ((document.get("keys") or {}).get(key_name) or {}).get("assisted") or {}
    return AssistedSpec.model_validate(raw)


def create_url(document: dict[str, Any], provider: str, credential_type: str) -> str | None:
    """Where a person creates ``credential_type`` at ``provider`` (its ``create_url``), if declared."""
    types = ((document.get("providers") or {}).get(provider) or {}).get("credential_types") or {}
    value = (types.get(credential_type) or {}).get("create_url")
    return value if isinstance(value, str) else None
