"""The request/response shapes shared by the router and the backends."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Logical operations, as Vault names them (HTTP verbs map onto these).
READ, LIST, CREATE, UPDATE, DELETE, PATCH = "read", "list", "create", "update", "delete", "patch"


@dataclass
class Request:
    operation: str  # READ, LIST, UPDATE (create/update is resolved by the existence check), DELETE, PATCH
    path: str  # logical path below /v1/, no leading slash
    query: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] = field(default_factory=dict, repr=False)  # may carry secrets
    content_type: str = ""
    token: Any = None  # the caller's tokens.Token (None on unauthenticated routes)


@dataclass
class Result:
    """What a backend answers. ``data is None`` and no ``auth`` → 204 No Content."""

    data: dict[str, Any] | None = None
    auth: dict[str, Any] | None = None
    status: int = 200
    raw: dict[str, Any] | None = None  # sent as-is, without the envelope (sys/health)
    warnings: list[str] | None = None
    mount_type: str = ""


def as_bool(value: Any, field_name: str) -> bool:
    from .errors import bad_request

    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in {"true", "1", "t"}:
        return True
    if isinstance(value, str) and value.lower() in {"false", "0", "f", ""}:
        return False
    if isinstance(value, int):
        return bool(value)
    raise bad_request(f'error converting input {value!r} for field "{field_name}": cannot parse as bool')


def as_int(value: Any, field_name: str) -> int:
    from .errors import bad_request

    if isinstance(value, bool):
        raise bad_request(f'error converting input {value!r} for field "{field_name}": expected an integer')
    try:
        return int(value)
    except (TypeError, ValueError):
        raise bad_request(f'error converting input {value!r} for field "{field_name}": expected an integer') from None


def as_str_list(value: Any) -> list[str]:
    """Vault's comma-string-or-list fields."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return [str(v).strip() for v in value if str(v).strip()]
