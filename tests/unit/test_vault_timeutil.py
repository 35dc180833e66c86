"""Go-style durations and timestamps as the Vault stand-in renders them."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from worker.sandbox.vault.errors import VaultHTTPError
from worker.sandbox.vault.timeutil import format_duration, parse_duration, rfc3339


@pytest.mark.parametrize("text, seconds", [("0s", 0), ("30s", 30), ("30m", 1800), ("1h30m", 5400),
                                           ("768h", 2764800), ("90", 90), (45, 45), ("1.5h", 5400), ("", 0)])
def test_parse_duration(text: object, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["ten", "5x", "1h junk", True])
def test_parse_duration_rejects_garbage(bad: object) -> None:
    with pytest.raises(VaultHTTPError) as info:
        parse_duration(bad, field="ttl")
    assert info.value.status == 400


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (30, "30s"), (1800, "30m0s"), (2764800, "768h0m0s"), (3661, "1h1m1s")])
def test_format_duration_like_go(seconds: int, text: str) -> None:
    assert format_duration(seconds) == text


def test_rfc3339_trims_fraction_and_uses_z() -> None:
    assert rfc3339(datetime(2024, 1, 2, 3, 4, 5, 120000, tzinfo=timezone.utc)) == "2024-01-02T03:04:05.12Z"
    assert rfc3339(datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc)) == "2024-01-02T03:04:05Z"
    assert rfc3339(None) == ""
