"""Reading providers' answers, shared by the provider adapters: timestamps, JSON paths, list-item
liveness flags, and the per-request metric."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from worker.errors import GarbageResponse, PermanentError
from worker.providers.jsonpath import JsonPathError, extract
from worker.metrics import PROVIDER_REQUESTS

#: Flag values a key list uses for a key that no longer works.
NOT_LIVE = ("true", "1", "yes", "revoked", "inactive", "disabled", "deleted", "expired")


def count_request(provider: str, call: str, status: str) -> None:
    """``keyrotor_provider_requests_total``, once per HTTP request; never breaks a rotation."""
    try:
        PROVIDER_REQUESTS.labels(provider=provider, call=call, status=status).inc()
    except Exception:  # metrics must never break a rotation
        pass


def parse_time(value: Any) -> datetime | None:
    """ISO-8601 (``Z`` allowed) or epoch seconds → aware UTC datetime; None if absent/unreadable."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return datetime.fromtimestamp(float(value), tz=timezone.utc)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return parsed.replace(tzinfo=timezone.utc) if parsed.tzinfo is None else parsed.astimezone(timezone.utc)
    return None


def field_at(document: Any, path: str | None, where: str) -> Any:
    """The value at a configured JSON path; a missing path is the inventory's fault, a missing value the answer's."""
    if path is None:
        raise PermanentError(f"{where}: no response path is configured")
    try:
        return extract(document, path)
    except JsonPathError as exc:
        raise GarbageResponse(f"{where}: {exc}") from None


def optional_at(document: Any, path: str | None) -> Any:
    """The value at a JSON path, or None when the path is not configured or not in the answer."""
    if path is None:
        return None
    try:
        return extract(document, path)
    except JsonPathError:
        return None


def listed_live(flag: Any) -> bool | None:
    """A list item's revoked/inactive flag as liveness: ``None`` when the item does not say."""
    if flag is None:
        return None
    if isinstance(flag, str):
        return flag.strip().lower() not in NOT_LIVE
    return not bool(flag)
