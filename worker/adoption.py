"""Taking a credential that exists already (created by hand, before keyrotor) into management.

A rotation revokes the old key after the grace period; most providers revoke *by id*
(``DELETE /api/api-key/{key_id}``), and keyrotor only knows the id of keys it issued. A key
written to Vault by hand has none, so a rotation would issue, promote and propagate the new key,
then stop in front of a revocation it can never make. ``adopt`` finds that id first:

1. the value: what Vault serves at the key's path (or, with nothing there yet, a value given on
   stdin, which is then written to Vault);
2. the provider checks it (it must authenticate) — and names its id when the verify call's answer
   carries one (``calls.verify.response.key_id``);
3. else the provider's list call, when each item shows a part of the key
   (``calls.list.response.secret_hint``, e.g. ``"sk_l…4f2a"``): exactly one live key must match;
4. else the operator gives it (``--key-id``), checked against the list when there is one.

It is recorded twice: as the ``keyrotor_key_id`` field next to the value in Vault (a new version
with the same value, check-and-set) and as the key's ``current`` version in the database, with an
audit event ``key_adopted``. ``rotation_blocker`` is what refuses a rotation that could never
revoke the current key (``keyrotor rotate`` up front, the issue step for any other producer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from sqlmodel import Session, select

from worker.clock import utcnow
from worker.db.models import AuditEvent, KeyVersion, ManagedKey, ProviderRecord, VersionStage, saved_id
from worker.db.session import session_scope
from worker.errors import ConfigError, PermanentError
from worker.inventory.field_types import template_placeholders
from worker.pipeline.context import PipelineContext
from worker.pipeline.runs import open_run_for_key
from worker.secret import Secret
from worker.pipeline.targets import rejected_at
from worker.vault.secret_store import SecretStore
from worker.vault.store import StoredSecret

ELLIPSES = ("…", "...", "***", "**", "*")


class AdoptionRefused(ConfigError):
    """Adoption cannot go ahead as asked; the message says what to do (exit 2)."""


class CredentialRejected(PermanentError):
    """The provider does not accept the credential being adopted (exit 1)."""


@dataclass(frozen=True)
class Adopted:
    key: str
    fingerprint: str
    provider_key_id: Optional[str]
    found_by: str            # given | verify | list_hint | not_needed
    vault_version: int


def revoke_needs_key_id(record: Optional[ProviderRecord], credential_type: Optional[str] = None) -> bool:
    """Whether the provider's revoke call names the key by ``{key_id}`` (URL, headers or body).
    An OAuth client removes a secret by its id; a private key's ``kid`` follows from the key."""
    if record is not None and record.kind == "oauth_client":
        return credential_type == "client_secret"
    if record is None or record.kind != "http" or (record.mode or "overlap") == "cutover":
        return False
    revoke = ((record.spec or {}).get("calls") or {}).get("revoke")
    if not revoke:
        return False
    texts: list[str] = []
    _collect_strings(revoke, texts)
    return any("key_id" in template_placeholders(text) for text in texts)


def _collect_strings(value: Any, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            if key != "response":
                _collect_strings(item, out)
    elif isinstance(value, list):
        for item in value:
            _collect_strings(item, out)


def hint_matches(hint: str, secret: Secret) -> bool:
    """``hint`` is what a provider shows of a key: a prefix and/or suffix around an ellipsis
    (``"sk_l…4f2a"``, ``"...4f2a"``), or the start of the key. Too short a hint matches nothing."""
    value = secret.reveal()
    for mark in ELLIPSES:
        if mark in hint:
            head, _, tail = hint.partition(mark)
            tail = tail.lstrip("".join(set("".join(ELLIPSES))))
            return len(head) + len(tail) >= 4 and value.startswith(head) and value.endswith(tail)
    return len(hint) >= 8 and value.startswith(hint)


def rotation_blocker(session: Session, key: ManagedKey, vault: SecretStore, *,
                     served: Optional[Callable[[], Optional[StoredSecret]]] = None) -> Optional[str]:
    """Why a rotation of ``key`` must not start (one line), or None: the current key has no
    provider key id and the provider revokes by id, so it could never be revoked afterwards.
    A key with no value in Vault yet is a first rotation (nothing to revoke). ``served``: what
    Vault serves for the key, when the caller reads it anyway (one read instead of two)."""
    record = session.get(ProviderRecord, key.provider)
    if not revoke_needs_key_id(record, key.credential_type):
        return None
    if record is not None and rejected_at(record.spec, key.credential_type, utcnow()):
        return None  # past its type's cutoff the key cannot authenticate: nothing to revoke
    stored = served() if served is not None else vault.read_current(key.vault_mount, key.vault_path, key.vault_field)
    if stored is None:
        return None
    if stored.provider_key_id:
        return None
    known = session.exec(select(KeyVersion).where(KeyVersion.key_id == key.id,
                                                  KeyVersion.stage == VersionStage.current.value)).all()
    if any(v.provider_key_id and v.fingerprint == stored.secret.fingerprint for v in known):
        return None
    return (f"key {key.name!r}: the provider's id of the key Vault serves at {key.vault_mount}/{key.vault_path} is "
            f"unknown, and provider {key.provider!r} revokes keys by id, so the old key could never be revoked; "
            f"run `keyrotor adopt {key.name}` first (add --key-id ID if the provider cannot tell)")


def adopt(ctx: PipelineContext, key_name: str, *, actor: str, secret: Optional[Secret] = None,
          key_id: Optional[str] = None) -> Adopted:
    """Take ``key_name``'s existing credential into management (see the module docstring).
    ``ctx`` is a ``PipelineContext`` (engine, Vault, provider factory)."""
    with session_scope(ctx.engine) as session:
        key = session.exec(select(ManagedKey).where(ManagedKey.name == key_name)).first()
        if key is None:
            raise AdoptionRefused(f"no managed key named {key_name!r}; apply the inventory first (`keyrotor config apply`)")
        run = open_run_for_key(session, saved_id(key))
        if run is not None:
            raise AdoptionRefused(f"key {key_name!r} has an open run {run.id} ({run.state}); let it end or resolve it "
                                  f"(`keyrotor resolve {run.id}`) before adopting")
        record = session.get(ProviderRecord, key.provider)
        session.expunge(key)
        provider = ctx.provider_factory(session, key)
    where = f"{key.vault_mount}/{key.vault_path}#{key.vault_field}"
    stored = ctx.vault.read_current(key.vault_mount, key.vault_path, key.vault_field)
    if stored is None and secret is None:
        raise AdoptionRefused(f"Vault has no value at {where}: write the existing key there, or pipe it to "
                              f"`keyrotor adopt {key_name} --from-stdin`; if no key exists yet, the first rotation "
                              f"creates one (`keyrotor rotate {key_name}`)")
    if stored is not None and secret is not None and stored.secret != secret:
        raise AdoptionRefused(f"Vault already serves another value at {where}; adopt that one (omit --from-stdin) "
                              "or replace it in Vault first")
    value = secret if stored is None else stored.secret
    assert value is not None
    outcome, verified_id = provider.identify(value, credential_type=key.credential_type) \
        if hasattr(provider, "identify") else (provider.check(value, credential_type=key.credential_type), None)
    outcome = getattr(outcome, "value", outcome)
    if outcome != "valid":
        raise CredentialRejected(f"provider {key.provider!r} answers {outcome} for the credential "
                                 f"{value.fingerprint} of {key_name!r}; adopt a key that works")
    found_id, found_by = _find_key_id(provider, key, value, given=key_id, verified=verified_id,
                                      needed=revoke_needs_key_id(record, key.credential_type))
    version = stored.version if stored is not None else None
    if stored is None or (found_id and stored.provider_key_id != found_id):
        # The same value again, now with its id next to it (check-and-set on what was read).
        version = ctx.vault.promote(key.vault_mount, key.vault_path, key.vault_field, value, found_id,
                                    expected_version=stored.version if stored is not None else None)
    assert version is not None
    _record(ctx.engine, key, value, found_id, version, found_by, actor)
    return Adopted(key_name, value.fingerprint, found_id, found_by, version)


def _find_key_id(provider: Any, key: ManagedKey, secret: Secret, *, given: Optional[str], verified: Optional[str],
                 needed: bool) -> tuple[Optional[str], str]:
    if given:
        if verified and verified != given:
            raise AdoptionRefused(f"provider {key.provider!r} says this credential is key {verified}, not {given}; "
                                  f"rerun with --key-id {verified} (or without --key-id)")
        if provider.can_list:
            listed = {k.key_id: k for k in provider.list_keys()}
            if given not in listed or listed[given].live is False:
                raise AdoptionRefused(f"provider {key.provider!r} lists no live key with id {given}; check the id")
        return given, "given"
    if verified:
        return verified, "verify"
    if provider.can_list:
        keys = [k for k in provider.list_keys() if k.live is not False and k.key_id]
        hinted = [k for k in keys if k.hint]
        matches = [k for k in hinted if hint_matches(k.hint or "", secret)]
        if len(matches) == 1:
            return matches[0].key_id, "list_hint"
        if needed:
            shown = ", ".join(f"{k.key_id} ({k.name or 'unnamed'})" for k in (matches or keys)[:10])
            why = (f"{len(matches)} listed keys match it" if matches else
                   "its list shows no part of the keys" if not hinted else "no listed key matches it")
            raise AdoptionRefused(f"provider {key.provider!r} cannot tell which key this is ({why}); give it with "
                                  f"--key-id ID (live keys: {shown or 'none'})")
    elif needed:
        raise AdoptionRefused(f"provider {key.provider!r} revokes keys by id and cannot tell this key's id; "
                              "give it with --key-id ID (from the provider's console)")
    return None, "not_needed"


def _record(engine: Any, key: ManagedKey, secret: Secret, key_id: Optional[str], vault_version: int, found_by: str,
            actor: str) -> None:
    now = utcnow()
    with session_scope(engine) as session:
        current = session.exec(select(KeyVersion).where(KeyVersion.key_id == key.id,
                                                        KeyVersion.stage == VersionStage.current.value)).all()
        mine = next((v for v in current if v.fingerprint == secret.fingerprint), None)
        for version in current:  # what the database thought was current was replaced out of band
            if version is not mine:
                version.stage = VersionStage.previous
                session.add(version)
        if mine is None:
            mine = KeyVersion(key_id=saved_id(key), run_id=None, credential_type=key.credential_type,
                              stage=VersionStage.current, fingerprint=secret.fingerprint, issued_at=None)
        mine.provider_key_id, mine.vault_version = key_id, vault_version
        session.add(mine)
        session.add(AuditEvent(at=now, key_id=key.id, actor=actor, event="key_adopted",
                               detail={"fingerprint": secret.fingerprint, "provider_key_id": key_id,
                                       "found_by": found_by, "vault_version": vault_version}))
