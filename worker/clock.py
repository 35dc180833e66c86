"""One place that tells the time, so tests can inject it (no day-long sleeps)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Callable, overload

_now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)  # noqa: E731


def utcnow() -> datetime:
    """Timezone-aware current time in UTC."""
    return _now()


def set_clock(fn: Callable[[], datetime] | None) -> None:
    """Replace the clock (tests); ``None`` restores the real one."""
    global _now
    _now = fn if fn is not None else (lambda: datetime.now(timezone.utc))


@overload
def as_utc(value: datetime) -> datetime: ...
@overload
def as_utc(value: None) -> None: ...
@overload
def as_utc(value: datetime | None) -> datetime | None: ...
def as_utc(value: datetime | None) -> datetime | None:
    """Naive datetimes read back from SQLite are UTC; make them aware."""
    if value is None:
        return None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
