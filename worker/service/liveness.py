"""Liveness: check keys' current credentials at their provider, a few per pass, so a credential
the provider stopped accepting is replaced before a consumer notices.

Each pass (scheduler job ``liveness``, leader only) checks at most ``per_pass`` keys: enabled,
with no open run, after the last one checked (the cursor lives in Redis, so a new leader goes on
where the old one stopped; it wraps around). The checks go through the provider's declared
``verify`` call and its shared rate limit: a provider that answers 429 or whose limit is reached
is left for the next pass. What a check finds:

- ``deprecated`` (Asana's 434): the deprecation job's rotation to the replacement type
  (``worker.service.deprecation.on_deprecated_response``, one run per key, type and hour);
- ``invalid`` (401/403: revoked outside keyrotor, or expired): a rotation (reason
  ``revoked_externally``, trigger ``liveness``), one per key and Vault version of the dead
  credential, so the next passes join it instead of piling up runs;
- ``valid``: nothing.

The credential is read from Vault into memory for the check only; no log line, audit event or
error text carries it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Protocol

from sqlalchemy import select
from sqlmodel import col

from worker.service.deprecation import on_deprecated_response
from worker.pipeline.context import PipelineContext
from worker.pipeline.outbox import enqueue_after_commit
from worker.service.hooks import Pipeline, default_pipeline
from worker.clock import utcnow
from worker.db.models import ManagedKey, RotationRun, saved_id
from worker.db.session import session_scope
from worker.errors import KeyrotorError, RateLimited
from worker.log import get_logger
from worker.providers.base import CheckOutcome

log = get_logger(__name__)

TRIGGER = "liveness"
REQUESTED_BY = "scheduler:liveness"
DEFAULT_PER_PASS = 10


class Cursor(Protocol):
    def get(self) -> int: ...
    def set(self, key_id: int) -> None: ...


class MemoryCursor:
    def __init__(self) -> None:
        self.value = 0

    def get(self) -> int:
        return self.value

    def set(self, key_id: int) -> None:
        self.value = key_id


class RedisCursor:
    """The id of the last key checked, shared by every scheduler (a new leader goes on from it)."""

    def __init__(self, client: Any, namespace: str) -> None:
        self._client = client
        self._key = f"{namespace}:liveness:cursor"

    def get(self) -> int:
        raw = self._client.get(self._key)
        try:
            return int(raw) if raw is not None else 0
        except ValueError:
            return 0

    def set(self, key_id: int) -> None:
        self._client.set(self._key, str(key_id))


@dataclass
class LivenessResult:
    checked: list[str] = field(default_factory=list)
    valid: list[str] = field(default_factory=list)
    rotations: dict[str, str] = field(default_factory=dict)      # key name → run id requested or joined
    deferred: list[str] = field(default_factory=list)            # rate-limited: next pass
    errors: dict[str, str] = field(default_factory=dict)          # key name → error class


def _next_keys(session: Any, after: int, limit: int) -> list[ManagedKey]:
    open_run = select(col(RotationRun.key_id)).where(col(RotationRun.finished_at).is_(None))
    base = select(ManagedKey).where(col(ManagedKey.enabled).is_(True), col(ManagedKey.id).notin_(open_run))
    keys = list(session.scalars(base.where(col(ManagedKey.id) > after).order_by(col(ManagedKey.id)).limit(limit)).all())
    if len(keys) < limit:  # wrap around
        seen = {k.id for k in keys}
        more = session.scalars(base.where(col(ManagedKey.id) <= after).order_by(col(ManagedKey.id)).limit(limit - len(keys))).all()
        keys += [k for k in more if k.id not in seen]
    return keys


def check_liveness(ctx: PipelineContext, *, cursor: Cursor, per_pass: int = DEFAULT_PER_PASS, now: datetime | None = None,
                   pipeline: Pipeline | None = None, on_outcome: Callable[[str, str], None] | None = None) -> LivenessResult:
    """One pass: ``ctx`` is a ``PipelineContext`` (engine, Vault, provider factory)."""
    now = now or utcnow()
    pipeline = pipeline or default_pipeline()
    result = LivenessResult()
    limited: set[str] = set()
    with session_scope(ctx.engine) as session:
        keys = [(saved_id(k), k.name, k.provider) for k in _next_keys(session, cursor.get(), per_pass)]
    for key_id, name, provider_name in keys:
        if provider_name in limited:
            result.deferred.append(name)
            continue
        try:
            outcome, version = _check(ctx, key_id)
        except RateLimited:
            limited.add(provider_name)
            result.deferred.append(name)
            continue
        except KeyrotorError as exc:
            result.errors[name] = type(exc).__name__
            log.warning("liveness_check_failed", key=name, error=type(exc).__name__, detail=str(exc)[:200])
            cursor.set(key_id)
            continue
        cursor.set(key_id)
        if outcome is None:
            continue
        result.checked.append(name)
        if on_outcome is not None:
            on_outcome(name, outcome.value)
        if outcome is CheckOutcome.valid:
            result.valid.append(name)
            continue
        run_id = _rotate(ctx, key_id, name, outcome, version, pipeline)
        if run_id is not None:
            result.rotations[name] = run_id
    log.info("liveness_pass", checked=len(result.checked), rotations=len(result.rotations),
             deferred=len(result.deferred), errors=len(result.errors))
    return result


def _check(ctx: PipelineContext, key_id: int) -> tuple[CheckOutcome | None, int | None]:
    """The provider's verdict on the key's current credential (None: nothing in Vault yet)."""
    with session_scope(ctx.engine) as session:
        key = session.get(ManagedKey, key_id)
        if key is None:  # removed from the inventory since this pass listed it
            return None, None
        provider = ctx.provider_factory(session, key)
        mount, path, field_name, credential_type = key.vault_mount, key.vault_path, key.vault_field, key.credential_type
    current = ctx.vault.read_current(mount, path, field_name)
    if current is None:
        return None, None
    return provider.check(current.secret, credential_type=credential_type), current.version


def _rotate(ctx: PipelineContext, key_id: int, name: str, outcome: CheckOutcome, version: int | None, pipeline: Pipeline) -> str | None:
    with session_scope(ctx.engine) as session:
        key = session.get(ManagedKey, key_id)
        if key is None:  # removed from the inventory since the check
            return None
        if outcome is CheckOutcome.deprecated:
            run = on_deprecated_response(session, key_name=name, credential_type=key.credential_type,
                                         requested_by=REQUESTED_BY, pipeline=pipeline)
            run_id = run.id if run is not None else None
        else:
            run, created = pipeline.request_rotation(
                session, key_name=name, reason="revoked_externally", trigger=TRIGGER, requested_by=REQUESTED_BY,
                idempotency_key=f"liveness:{key_id}:v{version}")
            if created:
                enqueue_after_commit(session, run, pipeline.enqueue_run)
            run_id = run.id
    log.warning("liveness_credential_rejected", key=name, outcome=outcome.value, run_id=run_id)
    return run_id
