"""The real PipelineContext wiring (context_from_settings): adapters built from the applied
records are reused across steps (no httpx client per call) and rebuilt when a record changes."""

from __future__ import annotations

from typing import Any

import pytest
from sqlmodel import Session

from worker.db.models import IntegrationRecord, ManagedKey, ProviderRecord
from worker.db.session import make_engine, session_scope
from worker.errors import PermanentError, TransientError
from worker.pipeline.context import _registry_integration_factory, _registry_provider_factory
from keyrotor_sandbox.provider import standin_provider_spec
from worker.settings import load_settings


@pytest.fixture
def engine(sqlite_url: str) -> Any:
    eng = make_engine(sqlite_url)
    with session_scope(eng) as session:
        session.add(ProviderRecord(name="standin", kind="http", mode="overlap",
                                   spec=standin_provider_spec("http://127.0.0.1:9", admin_token_ref={"env": "X_ADMIN"})))
        session.add(IntegrationRecord(name="hook", kind="webhook",
                                      spec={"kind": "webhook", "url": "http://127.0.0.1:9/hook",
                                            "signing_secret": {"env": "X_SIGNING"}}))
        session.flush()
        session.add(ManagedKey(name="standin/a", provider="standin", credential_type="api_key", owner="o@example.com",
                               vault_mount="secret", vault_path="apps/a", vault_field="api_key", grace_period_s=0,
                               integrations=["hook"], labels={}))
    yield eng
    eng.dispose()


def _settings() -> Any:
    return load_settings(redis_url="redis://127.0.0.1:1/0", queue_namespace="kr-test-ctx")


def test_provider_built_once_and_rebuilt_when_its_record_changes(engine: Any) -> None:
    factory = _registry_provider_factory(None, _settings())
    with Session(engine) as session:
        key = session.get(ManagedKey, 1)
        first, again = factory(session, key), factory(session, key)
    assert first is again and first.name == "standin"
    with session_scope(engine) as session:
        record = session.get(ProviderRecord, "standin")
        record.spec = {**record.spec, "base_url": "http://127.0.0.1:10"}
        session.add(record)
    with Session(engine) as session:
        rebuilt = factory(session, session.get(ManagedKey, 1))
    assert rebuilt is not first and rebuilt.spec.base_url == "http://127.0.0.1:10"
    assert first._http.is_closed and not rebuilt._http.is_closed
    # A chain still holding the replaced adapter (steps/provider.provider_for) gets a transient
    # error before anything is sent; the step's retry reads the changed record.
    with pytest.raises(TransientError, match="replaced by a changed inventory record"):
        first.list_keys()


def test_integration_built_once(engine: Any) -> None:
    factory = _registry_integration_factory(None, _settings())
    with Session(engine) as session:
        assert factory(session, "hook") is factory(session, "hook")
        with pytest.raises(PermanentError, match="config apply"):
            factory(session, "missing")
