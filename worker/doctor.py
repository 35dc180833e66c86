"""Is the configuration usable as deployed? Every secret reference resolves, and the database, Redis
and Vault answer. ``keyrotor config check --resolve`` reports all of it at once; ``keyrotor
worker`` logs the references of the applied inventory that do not resolve when it starts.

Values read while resolving are dropped at once: only the reference (``vault:MOUNT/PATH#FIELD``
or ``env:NAME``) and why it failed are ever printed or logged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from worker import log
from worker.connectivity import check_database, check_redis, open_vault
from worker.errors import ConfigError, KeyrotorError
from worker.secret import Secret
from worker.secret_refs import SecretRef, SecretResolver, is_per_key, iter_refs, make_resolver, unresolvable
from worker.db.session import session_scope
from worker.inventory.apply import latest_snapshot
from worker.inventory.loader import format_path
from worker.providers.request_parts import key_variables, resolve_ref

logger = log.get_logger("keyrotor.doctor")


@dataclass(frozen=True)
class ServiceProblem:
    service: str   # database | redis | vault
    message: str


def vault_for(settings: Any) -> tuple[Any, Optional[ServiceProblem]]:
    """``(VaultStore or None, problem)``: a store only when Vault answers and the token works."""
    if not settings.vault_addr:
        return None, ServiceProblem("vault", "VAULT_ADDR is not set; secret references to Vault cannot be resolved")
    store, check = open_vault(settings)
    return (store, None) if check.ok else (None, ServiceProblem("vault", f"{check.detail}; check VAULT_ADDR, the "
                                                                          "token or Kubernetes role, and that Vault is unsealed"))


def resolver_for(store: Any, vault_problem: Optional[ServiceProblem]) -> SecretResolver:
    """Resolve env and Vault references; with Vault unusable, say so per Vault reference instead of
    waiting out the store's retries for each one."""
    resolve = make_resolver(store)

    def checked(ref: SecretRef) -> Secret:
        if ref.vault is not None and store is None:
            why = "Vault is not usable (see the vault line)" if vault_problem else "no Vault is configured"
            raise ConfigError(f"secret reference {ref.describe()}: not checked, {why}")
        return resolve(ref)

    return checked


def reference_problems(document: Mapping[str, Any], resolve: SecretResolver) -> list[tuple[tuple[Any, ...], str]]:
    """``(location in document, message)`` for every secret reference that does not resolve."""
    problems = [(loc, why) for loc, _ref, why in unresolvable(document, resolve)]
    return problems + per_key_reference_problems(document, resolve)


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def per_key_reference_problems(document: Mapping[str, Any], resolve: SecretResolver) -> list[tuple[tuple[Any, ...], str]]:
    """References whose Vault path depends on the key (``users/{labels[user]}``), resolved for
    each key of their provider; located at the key, naming the reference."""
    providers = _mapping(document.get("providers"))
    keys = _mapping(document.get("keys"))
    problems: list[tuple[tuple[Any, ...], str]] = []
    for name, key in keys.items():
        provider_name = key.get("provider") if isinstance(key, Mapping) else None
        provider = providers.get(provider_name) if isinstance(provider_name, str) else None
        if not isinstance(provider, Mapping):
            continue
        variables = key_variables(key.get("labels") or {})
        for _loc, ref in iter_refs(provider):
            if not is_per_key(ref):
                continue
            try:
                resolve_ref(ref, variables, resolve)
            except Exception as exc:  # noqa: BLE001 - report every kind of failure, one line each
                why = str(exc) if isinstance(exc, KeyrotorError) else f"{ref.describe()}: {type(exc).__name__}"
                problems.append((("keys", name), f"provider {key.get('provider')!r} for this key: {why}"))
    return problems


def service_problems(settings: Any, vault_problem: Optional[ServiceProblem]) -> list[ServiceProblem]:
    """The database (migrated) and Redis must answer (Vault was checked by ``vault_for``)."""
    hints = {"database": "check KEYROTOR_DATABASE_URL", "redis": "check KEYROTOR_REDIS_URL"}
    problems = [ServiceProblem(c.name, f"{c.detail}; {hints[c.name]}")
                for c in (check_database(settings, timeout_s=2.0), check_redis(settings, timeout_s=2.0)) if not c.ok]
    if vault_problem is not None:
        problems.append(vault_problem)
    return problems


def log_unresolvable_references(engine: Any, settings: Any) -> int:
    """At worker start: one warning per secret reference of the applied inventory that does not
    resolve (a rotation needing it would fail); returns how many."""
    with session_scope(engine) as session:
        snapshot = latest_snapshot(session)
        document = dict(snapshot.document) if snapshot is not None else {}
    if not document:
        return 0
    store, vault_problem = vault_for(settings)
    if vault_problem is not None:
        logger.warning("vault.unusable", detail=vault_problem.message)
    found = unresolvable(document, resolver_for(store, vault_problem))
    for loc, ref, why in found:
        logger.warning("secret_ref.unresolvable", reference=ref.describe(), where=format_path(loc), error=why,
                       detail="rotations that need it fail before issuing; fix it, then check with "
                              "`keyrotor config check --resolve`")
    return len(found)
