"""A new version's expiry when the provider's answer carries none (worker/pipeline/expiry.py):
the declared lifetime, else the lifetime of the key in use, never silently nothing."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlmodel import Session

from worker.db.models import KeyVersion, ManagedKey, ProviderRecord, VersionStage
from worker.db.session import make_engine
from worker.pipeline.expiry import new_version_expiry

NOW = datetime(2026, 12, 1, tzinfo=timezone.utc)
DAY = timedelta(days=1)


@pytest.fixture
def session(sqlite_url: str):  # type: ignore[no-untyped-def]
    engine = make_engine(sqlite_url)
    with Session(engine) as s:
        yield s
    engine.dispose()


def seed(session: Session, *, lifetime: str | int | None = None, key_expires: datetime | None = None,
          last_rotated: datetime | None = None, current: tuple[datetime, datetime] | None = None) -> ManagedKey:
    ctype = {} if lifetime is None else {"lifetime": lifetime}
    session.add(ProviderRecord(name="wf", kind="http", mode="cutover", spec={"credential_types": {"user_api_key": ctype}}))
    session.flush()
    key = ManagedKey(name="wf/k", provider="wf", credential_type="user_api_key", owner="o", vault_path="apps/k",
                     expiry_lead_time_s=7 * 86400, max_age_s=90 * 86400, grace_period_s=60,
                     expires_at=key_expires, last_rotated_at=last_rotated, created_at=NOW - 100 * DAY)
    session.add(key)
    session.flush()
    if current is not None:
        session.add(KeyVersion(key_id=key.id, credential_type="user_api_key", stage=VersionStage.current,
                               issued_at=current[0], expires_at=current[1]))
        session.flush()
    return key


def test_the_providers_answer_wins(session: Session) -> None:
    key = seed(session, lifetime=30 * 86400)
    said = NOW + 10 * DAY
    assert new_version_expiry(session, key, "user_api_key", NOW, said).at == said


def test_the_declared_lifetime_when_the_answer_says_nothing(session: Session) -> None:
    key = seed(session, lifetime=30 * 86400, key_expires=NOW + 2 * DAY)
    expiry = new_version_expiry(session, key, "user_api_key", NOW, None)
    assert expiry.at == NOW + 30 * DAY and expiry.basis == "lifetime"


def test_the_lifetime_is_read_as_stored_in_either_form(session: Session) -> None:
    key = seed(session, lifetime="30d")
    assert new_version_expiry(session, key, "user_api_key", NOW, None).at == NOW + 30 * DAY


def test_without_a_lifetime_the_current_versions_lifetime_is_carried_forward(session: Session) -> None:
    key = seed(session, current=(NOW - 28 * DAY, NOW + 2 * DAY))
    expiry = new_version_expiry(session, key, "user_api_key", NOW, None)
    assert expiry.at == NOW + 30 * DAY and expiry.basis == "previous_lifetime"


def test_or_the_keys_own_expiry_since_its_last_rotation(session: Session) -> None:
    key = seed(session, key_expires=NOW + 3 * DAY, last_rotated=NOW - 27 * DAY)
    assert new_version_expiry(session, key, "user_api_key", NOW, None).at == NOW + 30 * DAY


def test_unknown_only_when_nothing_was_ever_known_of_its_lifetime(session: Session) -> None:
    key = seed(session)
    expiry = new_version_expiry(session, key, "user_api_key", NOW, None)
    assert expiry.at is None and expiry.basis == "unknown"
