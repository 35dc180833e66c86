"""What an applied provider record says about one of its credential types, read from the stored
spec as plain data (any provider kind): its declared ``lifetime`` and whether it carries admin
rights. Used by the pipeline (expiry of a new version) and by ``status`` / ``plan``."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Optional
from worker.inventory.field_types import parse_duration


def _type_spec(record: Any, credential_type: str) -> dict[str, Any]:
    spec = getattr(record, "spec", None)
    types = spec.get("credential_types") if isinstance(spec, dict) else None
    found = types.get(credential_type) if isinstance(types, dict) else None
    return found if isinstance(found, dict) else {}


def declared_lifetime(record: Any, credential_type: str) -> Optional[timedelta]:
    """The ``lifetime`` declared for ``credential_type`` (None if none or unreadable)."""
    raw = _type_spec(record, credential_type).get("lifetime")
    if raw is None:
        return None
    try:
        lifetime = parse_duration(raw)
    except Exception:  # noqa: BLE001 - a stored spec was validated at apply; unreadable = undeclared
        return None
    return lifetime if lifetime > timedelta(0) else None


def carries_admin_rights(record: Any, credential_type: str) -> bool:
    """Whether credentials of ``credential_type`` carry administrator rights (``admin: true``)."""
    return _type_spec(record, credential_type).get("admin") is True


__all__ = ["carries_admin_rights", "declared_lifetime"]
