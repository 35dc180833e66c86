"""next_due_at: the earliest of expiry - lead, last rotation + max age, deprecation cutoff - lead."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from sqlmodel import Session, SQLModel

from worker.service.due import compute_next_due, credential_type_from_spec, refresh_next_due
from worker.clock import as_utc
from worker.db.models import ManagedKey, ProviderRecord
from worker.db.session import make_engine
from worker.inventory.provider_parts import CredentialTypeSpec

NOW = datetime(2026, 6, 1, tzinfo=timezone.utc)
DAY = 86400


def key(**overrides) -> ManagedKey:  # type: ignore[no-untyped-def]
    values = dict(name="p/k", provider="p", credential_type="api_key", owner="o", vault_path="apps/k",
                  expiry_lead_time_s=7 * DAY, max_age_s=90 * DAY, grace_period_s=3600,
                  created_at=datetime(2026, 1, 1, tzinfo=timezone.utc))
    values.update(overrides)
    return ManagedKey(**values)


def deprecated(amnesty: datetime, rejected: datetime | None = None) -> CredentialTypeSpec:
    phases = [{"phase": "no_new_credentials", "from": (amnesty - timedelta(days=300)).isoformat()},
              {"phase": "amnesty", "from": amnesty.isoformat()}]
    if rejected:
        phases.append({"phase": "rejected", "from": rejected.isoformat()})
    return CredentialTypeSpec.model_validate({"replacement": "pat", "deprecation": phases})


def test_max_age_counts_from_creation_when_never_rotated() -> None:
    assert compute_next_due(key(), None, NOW) == (datetime(2026, 4, 1, tzinfo=timezone.utc), "max_age")


def test_max_age_counts_from_last_rotation() -> None:
    rotated = datetime(2026, 5, 20, 12, tzinfo=timezone.utc)
    assert compute_next_due(key(last_rotated_at=rotated), None, NOW) == (rotated + timedelta(days=90), "max_age")


def test_expiry_minus_lead_time_wins_when_earlier() -> None:
    k = key(expires_at=datetime(2026, 2, 10, tzinfo=timezone.utc))
    assert compute_next_due(k, None, NOW) == (datetime(2026, 2, 3, tzinfo=timezone.utc), "expiry")


def test_deprecation_cutoff_minus_lead_time() -> None:
    ct = deprecated(datetime(2026, 3, 1, tzinfo=timezone.utc), datetime(2026, 4, 1, tzinfo=timezone.utc))
    assert compute_next_due(key(), ct, NOW) == (datetime(2026, 2, 22, tzinfo=timezone.utc), "deprecation")


def test_no_new_credentials_alone_is_not_a_cutoff() -> None:
    ct = CredentialTypeSpec.model_validate({"deprecation": [{"phase": "no_new_credentials", "from": "2026-01-05T00:00:00Z"}]})
    assert compute_next_due(key(max_age_s=None), ct, NOW) == (None, None)


def test_past_cutoff_keeps_the_key_overdue() -> None:
    ct = deprecated(datetime(2017, 1, 1, tzinfo=timezone.utc), datetime(2017, 2, 1, tzinfo=timezone.utc))
    due, reason = compute_next_due(key(), ct, NOW)
    assert reason == "deprecation" and due is not None and due < NOW


def test_nothing_makes_it_due() -> None:
    assert compute_next_due(key(max_age_s=None), CredentialTypeSpec(), NOW) == (None, None)


def test_disabled_key_is_never_due() -> None:
    assert compute_next_due(key(enabled=False, expires_at=NOW), None, NOW) == (None, None)


def test_naive_sqlite_datetimes_are_utc() -> None:
    k = key(expires_at=datetime(2026, 2, 10), last_rotated_at=datetime(2026, 1, 15))
    due, _ = compute_next_due(k, None, NOW)
    assert due == datetime(2026, 2, 3, tzinfo=timezone.utc) and due.tzinfo is not None


def test_unsaved_key_ages_from_now() -> None:
    assert compute_next_due(key(created_at=None), None, NOW) == (NOW + timedelta(days=90), "max_age")


def test_credential_type_from_stored_spec() -> None:
    spec = {"credential_types": {"api_key": {"replacement": "pat", "deprecation": [{"phase": "rejected", "from": "2027-01-01T00:00:00Z"}]}, "pat": {}}}
    assert credential_type_from_spec(spec, "api_key").first_cutoff() == datetime(2027, 1, 1, tzinfo=timezone.utc)  # type: ignore[union-attr]
    assert credential_type_from_spec(spec, "missing") is None
    assert credential_type_from_spec(None, "api_key") is None


def test_refresh_next_due_reads_the_provider_record(tmp_path) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(f"sqlite:///{tmp_path}/due.db")
    SQLModel.metadata.create_all(engine)
    spec = {"credential_types": {"api_key": {"replacement": "pat", "deprecation": [
        {"phase": "amnesty", "from": "2026-03-01T00:00:00Z"}]}, "pat": {}}}
    with Session(engine) as session:
        session.add(ProviderRecord(name="p", kind="http", spec=spec))
        session.commit()   # no ORM relationship: insert the provider before the key that references it
        k = key()
        session.add(k)
        session.commit()
        assert refresh_next_due(session, k, NOW) is True
        session.commit()
        assert (k.due_reason, as_utc(k.next_due_at)) == ("deprecation", datetime(2026, 2, 22, tzinfo=timezone.utc))
        session.refresh(k)
        assert refresh_next_due(session, k, NOW) is False   # naive value read back compares equal
        k.credential_type = "pat"
        assert refresh_next_due(session, k, NOW) is True
        assert k.due_reason == "max_age"
    engine.dispose()
