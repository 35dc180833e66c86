"""``build_integration``: an inventory integration spec (or its DB record) → an ``Integration``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx
from pydantic import TypeAdapter

from worker.errors import ConfigError
from worker.integrations.base import Integration
from worker.integrations.vault_copy import VaultCopyIntegration
from worker.integrations.webhook import WebhookIntegration
from worker.inventory.schema import (
    IntegrationSpec,
    KubernetesSecretIntegrationSpec,
    VaultCopyIntegrationSpec,
    WebhookIntegrationSpec,
)
from worker.inventory.stored import spec_of
from worker.secret_refs import SecretResolver
from worker.integrations.kube_api import KubeApi
from worker.integrations.kubernetes_secret import KubernetesSecretIntegration
from worker.settings import get_settings

if TYPE_CHECKING:
    from worker.integrations.kube_api import KubeApi
    from worker.integrations.kube_restarts import BatchView
    from worker.settings import Settings
    from worker.vault.store import VaultStore

_ADAPTER: TypeAdapter[Any] = TypeAdapter(IntegrationSpec)


def _spec_of(record_or_spec: Any, name: str | None) -> tuple[str, Any]:
    return spec_of(record_or_spec, name, spec_types=(WebhookIntegrationSpec, VaultCopyIntegrationSpec,
                                                         KubernetesSecretIntegrationSpec),
                   validate=_ADAPTER.validate_python, builder="build_integration", kind="integration",
                   expected="an integration spec or record")


def build_integration(
    record_or_spec: Any,
    *,
    vault: "VaultStore | None",
    resolve: SecretResolver,
    http: httpx.Client | None = None,
    name: str | None = None,
    kubernetes: "KubeApi | None" = None,
    batch: "BatchView | None" = None,
    settings: "Settings | None" = None,
    **options: Any,
) -> Integration:
    """``kubernetes``/``batch``/``settings`` serve the ``kubernetes_secret`` kind: the API client
    (default: built from ``settings``, in-cluster unless ``KEYROTOR_K8S_API_SERVER``), the view of
    open runs that batches workload restarts (``worker.pipeline.restart_batch``), the timings."""
    integration_name, spec = _spec_of(record_or_spec, name)
    if isinstance(spec, WebhookIntegrationSpec):
        return WebhookIntegration(integration_name, spec, resolve=resolve, http=http, **options)
    if isinstance(spec, VaultCopyIntegrationSpec):
        if vault is None:
            raise ConfigError(f"integration {integration_name!r} (vault_copy) needs Vault, but none is configured")
        return VaultCopyIntegration(integration_name, spec, vault=vault)
    if isinstance(spec, KubernetesSecretIntegrationSpec):
        settings = settings or get_settings()
        return KubernetesSecretIntegration(
            integration_name, spec, api=kubernetes or KubeApi.from_settings(settings), batch=batch,
            settle_s=settings.k8s_restart_settle_s, max_wait_s=settings.k8s_batch_max_wait_s,
            poll_s=settings.k8s_rollout_poll_s, **options)
    raise ConfigError(f"integration {integration_name!r}: unknown kind")
