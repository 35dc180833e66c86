"""``build_integration``: an inventory integration spec (or its DB record) → an ``Integration``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx
from pydantic import TypeAdapter, ValidationError

from worker.errors import ConfigError
from worker.integrations.base import Integration
from worker.integrations.vault_copy import VaultCopyIntegration
from worker.integrations.webhook import WebhookIntegration
from worker.inventory.schema import IntegrationSpec, VaultCopyIntegrationSpec, WebhookIntegrationSpec
from worker.secret_refs import SecretResolver

if TYPE_CHECKING:
    from worker.vault.store import VaultStore

_ADAPTER: TypeAdapter[Any] = TypeAdapter(IntegrationSpec)


def _spec_of(record_or_spec: Any, name: str | None) -> tuple[str, Any]:
    if isinstance(record_or_spec, (WebhookIntegrationSpec, VaultCopyIntegrationSpec)):
        if not name:
            raise ConfigError("build_integration: pass name= with a bare integration spec")
        return name, record_or_spec
    data = getattr(record_or_spec, "spec", None)
    record_name = getattr(record_or_spec, "name", None) or name
    if not isinstance(data, dict) or not record_name:
        raise ConfigError(f"build_integration: expected an integration spec or record, got {type(record_or_spec).__name__}")
    try:
        return record_name, _ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise ConfigError(f"integration {record_name!r}: stored spec is invalid ({exc.error_count()} errors; re-run `keyrotor config apply`)") from None


def build_integration(
    record_or_spec: Any,
    *,
    vault: "VaultStore | None",
    resolve: SecretResolver,
    http: httpx.Client | None = None,
    name: str | None = None,
    **options: Any,
) -> Integration:
    integration_name, spec = _spec_of(record_or_spec, name)
    if isinstance(spec, WebhookIntegrationSpec):
        return WebhookIntegration(integration_name, spec, resolve=resolve, http=http, **options)
    if isinstance(spec, VaultCopyIntegrationSpec):
        if vault is None:
            raise ConfigError(f"integration {integration_name!r} (vault_copy) needs Vault, but none is configured")
        return VaultCopyIntegration(integration_name, spec, vault=vault)
    raise ConfigError(f"integration {integration_name!r}: unknown kind")
