"""Version bookkeeping: adopt the credential Vault serves now as the run's old version, and record
the run's new (pending) version."""

from __future__ import annotations

import enum
from typing import Any, Callable, Optional

from sqlalchemy import Table, bindparam, insert, select
from sqlmodel import Session, col

from worker.clock import utcnow
from worker.db import direct
from worker.db.direct import DirectStatements, Loader
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
    known = _current_versions(session, saved_id(key))
    for version in known:
        if version.fingerprint == fp:
            if version.vault_version != stored.version:
                version.vault_version = stored.version
                session.add(version)
            return version
    if known:  # the DB's idea of "current" was changed out of band
        for version in known:
            version.stage = VersionStage.previous
            session.add(version)
        session.flush()
    adopted = _insert(session, KeyVersion(
        key_id=saved_id(key), run_id=None, credential_type=key.credential_type, stage=VersionStage.current,
        provider_key_id=stored.provider_key_id, fingerprint=fp, vault_version=stored.version, issued_at=None))
    audit(session, snap.run, actor=ctx.actor, event="version_adopted",
          detail={"fingerprint": fp, "vault_version": stored.version, "provider_key_id": stored.provider_key_id})
    return adopted


_VERSIONS: Table = KeyVersion.__table__  # type: ignore[attr-defined]
_STATEMENTS = DirectStatements()
_VERSION = Loader(KeyVersion)
#: Versions this session read or wrote, held for its life: once clean, the session holds an
#: object only weakly, and the transition's hand-off (``steps.common.move_on``) finds them by
#: primary key, without a query.
_HELD = "keyrotor_held_versions"


def _held(session: Session, version: KeyVersion) -> KeyVersion:
    session.info.setdefault(_HELD, []).append(version)
    return version


def _current_versions(session: Session, key_id: int) -> list[KeyVersion]:
    """The key's versions in stage ``current``, in ``session`` (one, unless changed out of band)."""
    if direct.usable(session):
        rows = direct.execute(session, _STATEMENTS.get("current", session.get_bind().dialect, lambda: select(
            *_VERSIONS.c).where(_VERSIONS.c.key_id == bindparam("key_id"), _VERSIONS.c.stage == bindparam("stage"))),
            {"key_id": key_id, "stage": VersionStage.current.value})
        # Into the session as loaded rows (``merge(load=False)``: no query).
        return [_held(session, session.merge(_VERSION.load(row), load=False)) for row in rows]
    return list(session.scalars(select(KeyVersion).where(
        col(KeyVersion.key_id) == key_id, col(KeyVersion.stage) == VersionStage.current.value)).all())


def _insert(session: Session, version: KeyVersion) -> KeyVersion:
    """``version`` written (``INSERT … RETURNING`` it, sent directly on PostgreSQL; the ORM's flush
    elsewhere) and in ``session``, with its id."""
    if not direct.usable(session):
        session.add(version)
        session.flush()
        return _held(session, version)
    values = {column.key: _plain(getattr(version, column.key)) for column in _VERSIONS.columns if column.key != "id"}
    rows = direct.execute(session, _STATEMENTS.get(("insert", tuple(values)), session.get_bind().dialect, lambda: insert(
        _VERSIONS).values({name: bindparam(name, type_=_VERSIONS.c[name].type) for name in values}).returning(
        *_VERSIONS.c)), values)
    return _held(session, session.merge(_VERSION.load(rows[0]), load=False))


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def record_new_version(session: Session, snap: Snapshot, *, secret: Optional[Secret], key_id: Optional[str],
                        name: Optional[str], expires_at: Any, old: Optional[KeyVersion] = None) -> int:
    """The run's new version, pending; its expiry as the provider said or as derived
    (``worker/pipeline/expiry.py``: a declared lifetime, or the lifetime of the key in use, which
    is ``old`` when the caller just recorded it with ``ensure_old_version``)."""
    issued_at = utcnow()
    if secret is not None:
        expires_at = new_version_expiry(session, snap.key, snap.credential_type, issued_at, expires_at,
                                        current=old).at
    version = _insert(session, KeyVersion(
        key_id=saved_id(snap.key), run_id=snap.run.id, credential_type=snap.credential_type, stage=VersionStage.pending,
        provider_key_id=key_id, provider_key_name=name, fingerprint=secret.fingerprint if secret is not None else None,
        issued_at=issued_at, expires_at=expires_at))
    return saved_id(version)
