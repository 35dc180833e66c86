"""Before a run has any effect outside the database: resolve every secret reference it will need.

A missing ``{env: …}`` or Vault reference (a provider's management token, an integration's signing
secret) used to surface in the middle of the rotation, after the new key was issued or even
promoted. Checked here, in the first step, it fails the run before the provider issues anything
(a ``ConfigError``: never retried). Vault being unreachable is transient and retried as usual.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ARRAY, Table, any_, bindparam, select

from worker.db import direct
from worker.db.direct import DirectStatements, Loader
from worker.db.models import IntegrationRecord, ManagedKey, ProviderRecord
from worker.db.session import session_scope
from worker.errors import ConfigError, TransientError
from worker.pipeline.context import PipelineContext
from worker.providers.request_parts import key_variables, resolve_ref
from worker.secret_refs import iter_refs


_INTEGRATIONS: Table = IntegrationRecord.__table__  # type: ignore[attr-defined]
_STATEMENTS = DirectStatements()
_RECORDS = Loader(IntegrationRecord)


def _records_named() -> Any:
    return select(*_INTEGRATIONS.c).where(
        _INTEGRATIONS.c.name == any_(bindparam("names", type_=ARRAY(_INTEGRATIONS.c.name.type))))


def integration_records(session: Any, key: ManagedKey) -> dict[str, IntegrationRecord]:
    """The applied records of the key's integrations, by name (one missing is left out): one
    statement for all of them on PostgreSQL, one look-up each elsewhere."""
    names = list(key.integrations or [])
    if not names:
        return {}
    if direct.usable(session):
        rows = direct.execute(session, _STATEMENTS.get("named", session.get_bind().dialect, _records_named),
                              {"names": names})
        found = {record.name: record for record in map(_RECORDS.load, rows)}
        return {name: found[name] for name in names if name in found}
    return {name: record for name in names if (record := session.get(IntegrationRecord, name)) is not None}


def run_specs(session: Any, key: ManagedKey, provider_record: ProviderRecord | None = None,
              integrations: dict[str, IntegrationRecord] | None = None) -> list[tuple[str, Any]]:
    """``(owner, stored spec)`` of the key's provider and each of its integrations, as applied
    (``integrations``: their records, when the caller read them already)."""
    record = provider_record or session.get(ProviderRecord, key.provider)
    specs: list[tuple[str, Any]] = [(f"provider {key.provider!r}", record.spec)] if record is not None else []
    records = integrations if integrations is not None else integration_records(session, key)
    for name in key.integrations or []:
        integration = records.get(name)
        if integration is not None:
            specs.append((f"integration {name!r}", integration.spec))
    return specs


def check_run_references(ctx: PipelineContext, key: ManagedKey, provider_record: ProviderRecord | None = None) -> None:
    """Raise one ``ConfigError`` naming every reference of the run's provider and integrations that
    does not resolve (the values read are dropped at once)."""
    with session_scope(ctx.engine) as session:
        specs = run_specs(session, key, provider_record)
    check_spec_references(ctx, key, specs)


def check_spec_references(ctx: PipelineContext, key: ManagedKey, specs: list[tuple[str, Any]]) -> None:
    """``check_run_references`` for specs the caller read already (``run_specs``)."""
    resolve = ctx.resolver()
    problems: list[str] = []
    variables = key_variables(key.labels or {})
    for owner, spec in specs:
        for _loc, ref in iter_refs(spec):
            try:
                resolve_ref(ref, variables, resolve)
            except TransientError:
                raise
            except Exception as exc:  # noqa: BLE001 - collect every broken reference
                problems.append(f"{owner}: {exc if isinstance(exc, ConfigError) else type(exc).__name__}")
    if problems:
        raise ConfigError("unresolvable secret reference(s), nothing was issued: " + "; ".join(problems)
                          + " (fix them, `keyrotor config check --resolve` shows all, then request the rotation again)")
