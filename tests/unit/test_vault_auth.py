"""Token lease arithmetic and the optional background renewer (no HTTP)."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from typing import Any

from worker.vault.auth import BackgroundRenewer, TokenLease, VaultAuth
from worker.vault.errors import VaultUnavailable

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)


def test_lease_renewal_window_is_the_last_third() -> None:
    lease = TokenLease(period_s=900, obtained_at=T0, remaining_s=900, renewable=True)
    assert not lease.due_for_renewal(T0 + timedelta(seconds=599))
    assert lease.due_for_renewal(T0 + timedelta(seconds=601))
    assert not lease.expired(T0 + timedelta(seconds=898))
    assert lease.expired(T0 + timedelta(seconds=900))


def test_lease_after_lookup_uses_remaining_not_period() -> None:
    # Looked up a 15-minute token with 4 minutes left: due at once.
    lease = TokenLease(period_s=900, obtained_at=T0, remaining_s=240, renewable=True)
    assert lease.due_for_renewal(T0) and lease.expires_at == T0 + timedelta(seconds=240)


def test_non_expiring_token_is_never_due() -> None:
    lease = TokenLease(period_s=0, obtained_at=T0, remaining_s=0, renewable=False)
    assert lease.expires_at is None
    assert not lease.due_for_renewal(T0 + timedelta(days=3650)) and not lease.expired(T0 + timedelta(days=3650))


class CountingAuth(VaultAuth):
    def __init__(self, fail_first: bool) -> None:
        super().__init__()
        self.calls = 0
        self.fail_first = fail_first
        self.done = threading.Event()

    def _prepare(self, client: Any, addr: str) -> None:
        self.calls += 1
        if self.fail_first and self.calls == 1:
            raise VaultUnavailable("down")
        if self.calls >= 3:
            self.done.set()


def test_background_renewer_keeps_going_after_errors_and_stops() -> None:
    auth = CountingAuth(fail_first=True)
    auth.lease = TokenLease(period_s=0.06, obtained_at=T0, remaining_s=0.06, renewable=True)
    renewer = BackgroundRenewer(auth, client=object(), min_interval_s=0.01).start()  # type: ignore[arg-type]
    try:
        assert auth.done.wait(2.0), "the renewer should call prepare repeatedly, surviving a failure"
    finally:
        renewer.stop()
    calls = auth.calls
    assert not renewer._thread.is_alive()
    assert auth.calls == calls  # stopped: no more calls
