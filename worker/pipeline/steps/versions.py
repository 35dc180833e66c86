"""Version bookkeeping: adopt the credential Vault serves now as the run's old version, and record
the run's new (pending) version."""

from __future__ import annotations

from typing import Any, Callable, Optional

from sqlmodel import Session, col, select
from sqlmodel.sql.expression import SelectOfScalar

from worker.clock import utcnow
from worker.db.models import KeyVersion, VersionStage, saved_id
from worker.pipeline.context import PipelineContext
from worker.pipeline.expiry import new_version_expiry
from worker.pipeline.runs import audit
from worker.pipeline.steps.common import Snapshot
from worker.secret import Secret
from worker.vault.store import StoredSecret


def ensure_old_version(ctx: PipelineContext, snap: Snapshot, session: Session, *,
                       served: Optional[Callable[[], Optional[StoredSecret]]] = None) -> Optional[KeyVersion]:
    """The version Vault serves now, as a ``current`` KeyVersion (adopted if the DB has none),
    flushed. ``served``: what Vault serves, when the step read it already."""
    key = snap.key
    stored = served() if served is not None else ctx.vault.read_current(key.vault_mount, key.vault_path, key.vault_field)
    if stored is None:
        return None
    fp = stored.secret.fingerprint
    known = session.exec(
        _select_versions(saved_id(key), VersionStage.current)
    ).all()
    for version in known:
        if version.fingerprint == fp:
            if version.vault_version != stored.version:
                version.vault_version = stored.version
                session.add(version)
            return version
    adopted = KeyVersion(key_id=saved_id(key), run_id=None, credential_type=key.credential_type, stage=VersionStage.current,
                         provider_key_id=stored.provider_key_id, fingerprint=fp, vault_version=stored.version,
                         issued_at=None)
    for version in known:  # the DB's idea of "current" was changed out of band
        version.stage = VersionStage.previous
        session.add(version)
    session.add(adopted)
    session.flush()
    audit(session, snap.run, actor=ctx.actor, event="version_adopted",
          detail={"fingerprint": fp, "vault_version": stored.version, "provider_key_id": stored.provider_key_id})
    return adopted


def _select_versions(key_id: int, stage: VersionStage) -> SelectOfScalar[KeyVersion]:
    return select(KeyVersion).where(col(KeyVersion.key_id) == key_id, col(KeyVersion.stage) == stage.value)


def record_new_version(session: Session, snap: Snapshot, *, secret: Optional[Secret], key_id: Optional[str],
                        name: Optional[str], expires_at: Any, old: Optional[KeyVersion] = None) -> int:
    """The run's new version, pending; its expiry as the provider said or as derived
    (``worker/pipeline/expiry.py``: a declared lifetime, or the lifetime of the key in use, which
    is ``old`` when the caller just recorded it with ``ensure_old_version``)."""
    issued_at = utcnow()
    if secret is not None:
        expires_at = new_version_expiry(session, snap.key, snap.credential_type, issued_at, expires_at,
                                        current=old).at
    version = KeyVersion(key_id=saved_id(snap.key), run_id=snap.run.id, credential_type=snap.credential_type,
                         stage=VersionStage.pending, provider_key_id=key_id, provider_key_name=name,
                         fingerprint=secret.fingerprint if secret is not None else None, issued_at=issued_at,
                         expires_at=expires_at)
    session.add(version)
    session.flush()
    assert version.id is not None
    # Once flushed and clean, the session holds it only weakly: held for the session's life, so
    # the transition's hand-off (``steps.common.move_on``) finds it by primary key, without a query.
    session.info.setdefault("keyrotor_recorded_versions", []).append(version)
    return version.id
