"""Small helpers shared by the steps: holding secrets in memory, safe error text, adapters'
result shapes, Vault lookups that may legitimately find nothing."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Iterator, Optional

from worker import log
from worker.inventory.field_types import parse_duration
from worker.integrations.base import Announcement
from worker.vault.errors import VaultNotFound
from worker.vault.secret_store import SecretStore
from worker.vault.store import remembering_versions
from worker.secret import Secret
from worker.clock import as_utc

_held = threading.local()


def _held_values() -> set[str]:
    if not hasattr(_held, "values"):
        _held.values = set()
    return _held.values


@contextmanager
def holding(*secrets: Optional[Secret]) -> Iterator[None]:
    """While a step holds secret values, any accidental appearance in a log line or in error text
    we store is blanked; the values are forgotten when the step is done."""
    values = [s.reveal() for s in secrets if s is not None]
    for value in values:
        log.register_secret(value)
        _held_values().add(value)
    try:
        yield
    finally:
        for value in values:
            log.forget_secret(value)
            _held_values().discard(value)


def safe_error(exc: BaseException, limit: int = 500) -> str:
    """``Class: message`` with every secret this thread holds blanked, truncated (for DB and audit)."""
    text = f"{type(exc).__name__}: {exc}"
    for value in _held_values():
        text = text.replace(value, log.REDACTED)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def enum_value(value: Any) -> str:
    """``CheckOutcome.valid`` / ``"valid"`` → ``"valid"`` (adapters may return either)."""
    return str(getattr(value, "value", value))


def verify_status(result: Any) -> tuple[str, Optional[str]]:
    """An integration's VerifyResult as (ok | mismatch | unchecked, reported fingerprint)."""
    status = getattr(result, "status", result)
    if isinstance(result, bool):
        status = "ok" if result else "mismatch"
    reported = getattr(result, "fingerprint", None) or getattr(result, "reported_fingerprint", None)
    return enum_value(status), reported


def read_pending(vault: SecretStore, run_id: str) -> Optional[tuple[Secret, Optional[str]]]:
    """The staged secret of a run, or ``None`` when nothing is staged."""
    try:
        return vault.read_pending(run_id)
    except VaultNotFound:
        return None


_chain = threading.local()


@contextmanager
def chain_memory() -> Iterator[None]:
    """Steps run back to back in one message (``worker/runtime/chains.py``) keep the secret a run
    staged in memory from the step that staged it to the last that needs it, instead of reading it
    back from Vault in every step; forgotten when the chain ends. Outside a chain nothing is kept.
    The chain also remembers the Vault versions it read (``remembering_versions``) and the provider
    checks it made (``fresh_check``)."""
    _chain.staged = {}
    _chain.checks = {}
    try:
        with remembering_versions():
            yield
    finally:
        _chain.staged = None
        _chain.checks = None


def remember_staged(run_id: str, secret: Secret, key_id: Optional[str]) -> None:
    """This chain staged (or adopted from staging) ``secret`` for ``run_id``."""
    staged = getattr(_chain, "staged", None)
    if staged is not None:
        staged[run_id] = (secret, key_id)


def staged_in_chain(run_id: str) -> Optional[tuple[Secret, Optional[str]]]:
    """What this chain staged for ``run_id`` (its fingerprint is still checked against the run's
    record by whoever uses it, exactly as a value read back from Vault is)."""
    staged = getattr(_chain, "staged", None)
    return staged.get(run_id) if staged else None


#: How long a provider's "valid" for a credential stands in for asking again, inside one chain.
FRESH_CHECK_S = 5.0


def fresh_check(provider: str, fingerprint: str, credential_type: str) -> Optional[float]:
    """Seconds since this chain last heard the provider accept this very credential, if that was
    within ``FRESH_CHECK_S``: retire, following verify at once (no grace period), does not ask the
    provider the same question again milliseconds later. A step that runs in a message of its own
    (after a grace period, a retry) asks."""
    checks = getattr(_chain, "checks", None)
    at = checks.get((provider, fingerprint, credential_type)) if checks else None
    if at is None:
        return None
    age = time.monotonic() - at
    return age if age <= FRESH_CHECK_S else None


def remember_valid_check(provider: str, fingerprint: str, credential_type: str) -> None:
    """The provider just accepted this credential (inside a chain; nothing is kept outside one)."""
    checks = getattr(_chain, "checks", None)
    if checks is not None:
        checks[(provider, fingerprint, credential_type)] = time.monotonic()


def announcement(**fields: Any) -> Announcement:
    return Announcement(**fields)


def parse_seconds(value: Any, default: float) -> float:
    """A duration from a stored inventory spec (``2``, ``0.5``, ``"2s"``, ``"15m"``, ``"1h30m"``) in
    seconds, read with the inventory's own parser; ``default`` when absent or unreadable."""
    if value is None:
        return default
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    try:
        return parse_duration(str(value).strip().lower()).total_seconds()
    except Exception:  # the inventory was validated when applied; a stray value means the default
        return default


def seconds_between(later: datetime, earlier: Optional[datetime]) -> float:
    if earlier is None:
        return 0.0
    return (as_utc(later) - as_utc(earlier)).total_seconds()
