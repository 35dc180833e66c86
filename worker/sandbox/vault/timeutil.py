"""Vault speaks Go: durations like ``30m0s`` and RFC 3339 timestamps with nanoseconds."""

from __future__ import annotations

import re
from datetime import datetime, timezone

from worker.clock import utcnow

from .errors import bad_request

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h|d)")


def parse_duration(value: object, *, field: str = "duration") -> int:
    """Seconds from a Go duration string (``1h30m``), a bare number of seconds, or an int."""
    if value is None or value == "":
        return 0
    if isinstance(value, bool):
        raise bad_request(f"invalid duration for {field}: {value!r}")
    if isinstance(value, (int, float)):
        return int(value)
    text = str(value).strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    sign = -1 if text.startswith("-") else 1
    body = text.lstrip("+-")
    pos, total = 0, 0.0
    for match in _PART.finditer(body):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(body) or not body:
        raise bad_request(f'error converting input {text} for field "{field}": time: invalid duration "{text}"')
    return sign * int(total)


def format_duration(seconds: int) -> str:
    """Go's ``time.Duration.String()`` for whole seconds: ``0s``, ``30s``, ``30m0s``, ``768h0m0s``."""
    if seconds == 0:
        return "0s"
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{sign}{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{sign}{minutes}m{secs}s"
    return f"{sign}{secs}s"


def rfc3339(moment: datetime | None) -> str:
    """Go's RFC3339Nano (trailing zeros of the fraction dropped); '' for no time, as Vault does."""
    if moment is None:
        return ""
    moment = moment.astimezone(timezone.utc)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += "." + f"{moment.microsecond:06d}".rstrip("0")
    return text + "Z"


def now() -> datetime:
    return utcnow()
