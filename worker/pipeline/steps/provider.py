"""Calls to the key's provider from a step: build the adapter, check a credential, and name a
credential type the provider reports as deprecated. (The adapter counts each request it makes in
``keyrotor_provider_requests_total``; steps do not count them again.)"""

from __future__ import annotations

from typing import Any, Optional

from worker.db.session import session_scope
from worker.pipeline.context import PipelineContext
from worker.service.deprecation import NewCredentialDeprecated, new_credential_deprecated
from worker.pipeline.effects import enum_value, fresh_check, remember_valid_check
from worker.pipeline.steps.common import Snapshot
from worker.providers.base import Provider, revoke_outcome
from worker.secret import Secret


def provider_for(ctx: PipelineContext, snap: Snapshot) -> Provider:
    """The key's provider from the factory, once per chain (kept on the snapshot, which the chain
    hands over with the same record). The record the snapshot read is put into the factory's
    session, so its lookup is answered without a query (and without taking a connection); a
    record changed by ``config apply`` is seen by the next snapshot read from the database."""
    if snap.provider is None:
        with session_scope(ctx.engine) as session:
            # Held in a local: the identity map only keeps a weak reference to a clean object.
            record = session.merge(snap.provider_record, load=False) if snap.provider_record is not None else None
            snap.provider = ctx.provider_factory(session, snap.key)
            del record
    return snap.provider


def revoke_key(provider: Provider, *, key_id: Optional[str], secret: Optional[Secret], credential_type: str) -> str:
    """Revoke a key and say what the provider answered: ``revoked``, ``already_gone`` (404), or
    ``manual`` when the provider has no revoke call (a person must)."""
    if not provider.can_revoke:
        return "manual"
    answer = provider.revoke(key_id=key_id, secret=secret, credential_type=credential_type)
    return revoke_outcome(answer).value


def check_credential(provider: Provider, secret: Secret, credential_type: str) -> str:
    """Ask the provider whether ``secret`` authenticates; a ``valid`` is remembered for the chain."""
    outcome = enum_value(provider.check(secret, credential_type=credential_type))
    if outcome == "valid":
        remember_valid_check(provider.name, secret.fingerprint, credential_type)
    return outcome


def recheck_credential(provider: Provider, secret: Secret, credential_type: str) -> tuple[str, Optional[float]]:
    """``check_credential`` for retire's check of the new credential, which verify accepted: when
    this chain heard the provider accept this very credential a moment ago (``effects.fresh_check``:
    verify and retire with no grace period between them), that answer stands and no request is
    made. Returns the outcome and, when it was not asked again, how many seconds ago it was.
    (verify always asks: its check is the first after promotion, and its failure rolls back.)"""
    age = fresh_check(provider.name, secret.fingerprint, credential_type)
    if age is not None:
        return "valid", age
    return check_credential(provider, secret, credential_type), None


def deprecated_error(ctx: PipelineContext, snap: Snapshot, where: str) -> NewCredentialDeprecated:
    return new_credential_deprecated(ctx.engine, provider=snap.key.provider, key_name=snap.key.name,
                                     credential_type=snap.credential_type, where=where)
