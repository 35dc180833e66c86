"""A contract-faithful stand-in for ``worker.pipeline.requests`` used by the scheduler tests.

It follows docs/internals.md "Rotation requests": same idempotency key → same run; an open run
for the key → that run (joined); the database's unique indexes decide races. Step messages are
recorded instead of sent. Tests that need the real pipeline import it instead.
"""

from __future__ import annotations

import threading
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from worker.service.hooks import Pipeline
from worker.clock import utcnow
from worker.db.models import ManagedKey, ProviderRecord, RotationRun
from worker.protocol.states import RunState


class RecordingPipeline:
    def __init__(self) -> None:
        self.enqueued: list[str] = []
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def request_rotation(self, session: Session, *, key_name: str, reason: str, trigger: str, requested_by: str,
                         idempotency_key: str | None = None, not_before: datetime | None = None,
                         emergency: bool = False, target_credential_type: str | None = None) -> tuple[RotationRun, bool]:
        with self._lock:
            self.requests.append({"key": key_name, "reason": reason, "trigger": trigger, "idempotency_key": idempotency_key,
                                  "emergency": emergency, "target_credential_type": target_credential_type})
        key = session.exec(select(ManagedKey).where(ManagedKey.name == key_name)).one()
        existing = self._existing(session, key, idempotency_key)
        if existing is not None:
            return existing, False
        provider = session.get(ProviderRecord, key.provider)
        now = utcnow()
        run = RotationRun(
            id=uuid.uuid4().hex, key_id=key.id, state=RunState.requested.value, mode=provider.mode if provider else "overlap",
            trigger=trigger, reason=reason, requested_by=requested_by, idempotency_key=idempotency_key,
            emergency=emergency, target_credential_type=target_credential_type, not_before=not_before,
            created_at=now, updated_at=now,
        )
        try:
            with session.begin_nested():
                session.add(run)
        except IntegrityError:  # a concurrent request won: join its run
            existing = self._existing(session, key, idempotency_key)
            assert existing is not None
            return existing, False
        return run, True

    @staticmethod
    def _existing(session: Session, key: ManagedKey, idempotency_key: str | None) -> RotationRun | None:
        if idempotency_key:
            run = session.exec(select(RotationRun).where(RotationRun.idempotency_key == idempotency_key)).first()
            if run is not None:
                return run
        return session.exec(select(RotationRun).where(RotationRun.key_id == key.id, RotationRun.finished_at.is_(None))).first()  # type: ignore[union-attr]

    def enqueue_run(self, run: RotationRun) -> None:
        with self._lock:
            self.enqueued.append(run.id)

    def as_pipeline(self) -> Pipeline:
        return Pipeline(request_rotation=self.request_rotation, enqueue_run=self.enqueue_run)


ALLOY_SPEC = {
    "kind": "http", "mode": "overlap", "base_url": "https://alloy.example",
    "auth": {"type": "bearer", "token": {"env": "ALLOY_ADMIN"}},
    "credential_types": {"api_key": {}},
    "calls": {
        "issue": {"method": "POST", "url": "{base_url}/api/api-key", "response": {"secret": "$.apiKey", "key_id": "$.id"}},
        "verify": {"method": "GET", "url": "{base_url}/api/user/me", "auth": {"type": "bearer", "token": "{secret}"}},
        "revoke": {"method": "DELETE", "url": "{base_url}/api/api-key/{key_id}"},
    },
}

ASANA_SPEC = {
    "kind": "http", "mode": "assisted", "base_url": "https://asana.example",
    "status_codes": {"deprecated": [434]},
    "credential_types": {
        "api_key": {"replacement": "personal_access_token", "deprecation": [
            {"phase": "no_new_credentials", "from": "2016-01-01T00:00:00Z"},
            {"phase": "amnesty", "from": "2017-01-01T00:00:00Z", "headers": {"Asana-Amnesty-Api-Key": "true"}},
            {"phase": "rejected", "from": "2017-02-01T00:00:00Z"},
        ]},
        "personal_access_token": {},
    },
    "calls": {"verify": {"method": "GET", "url": "{base_url}/api/1.0/users/me", "auth": {"type": "bearer", "token": "{secret}"}}},
}


def add_provider(session: Session, name: str, spec: dict[str, Any]) -> ProviderRecord:
    record = ProviderRecord(name=name, kind=spec["kind"], mode=spec.get("mode", "overlap"), spec=spec, updated_at=utcnow())
    session.add(record)
    return record


def add_key(session: Session, name: str, provider: str, **fields: Any) -> ManagedKey:
    values: dict[str, Any] = dict(credential_type="api_key", owner="team@example.com", vault_path=f"apps/{name}",
                                  created_at=utcnow(), updated_at=utcnow())
    values.update(fields)
    key = ManagedKey(name=name, provider=provider, **values)
    session.add(key)
    session.flush()
    return key
