"""``build_integration``: an inventory integration spec (or its DB record) → an ``Integration``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx
from pydantic import TypeAdapter

from worker.errors import ConfigError
from worker.integrations.base import Integration
from worker.integrations.vault_copy import VaultCopyIntegration
from worker.integrations.webhook import WebhookIntegration
from worker.inventory.schema import IntegrationSpec, VaultCopyIntegrationSpec, WebhookIntegrationSpec
from worker.inventory.stored import spec_of
from worker.secret_refs import SecretResolver

if TYPE_CHECKING:
    from worker.vault.store import VaultStore

_ADAPTER: TypeAdapter[Any] = TypeAdapter(IntegrationSpec)


def _spec_of(record_or_spec: Any, name: str | None) -> tuple[str, Any]:
    return spec_of(record_or_spec, name, spec_types=(WebhookIntegrationSpec, VaultCopyIntegrationSpec),
                   validate=_ADAPTER.validate_python, builder="build_integration", kind="integration",
                   expected="an integration spec or record")


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
