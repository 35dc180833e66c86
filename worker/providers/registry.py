"""``build_provider``: an inventory provider spec (or its DB record) → a ready ``Provider``.

New provider kinds join here with their own module: the generic HTTP provider and OAuth 2.0 clients.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Callable

import httpx

from worker.clock import utcnow
from worker.errors import ConfigError
from worker.inventory.oauth_schema import OAuthClientProviderSpec
from worker.inventory.schema import PROVIDER_KINDS, HttpProviderSpec
from worker.inventory.stored import spec_of
from worker.providers.base import Provider
from worker.providers.http import HttpProvider
from worker.providers.oauth_client import OAuthClientProvider
from worker.providers.ratelimit import RateLimiter
from worker.secret_refs import SecretResolver


def _validate(data: dict[str, Any]) -> HttpProviderSpec | OAuthClientProviderSpec:
    if data.get("kind") == "oauth_client":
        return OAuthClientProviderSpec.model_validate(data)
    return HttpProviderSpec.model_validate(data)


def _spec_of(record_or_spec: Any, name: str | None) -> tuple[str, HttpProviderSpec | OAuthClientProviderSpec]:
    return spec_of(record_or_spec, name, spec_types=(HttpProviderSpec, OAuthClientProviderSpec), validate=_validate,
                   builder="build_provider", kind="provider", expected="a provider spec or a provider record")


def build_provider(
    record_or_spec: Any,
    *,
    resolve: SecretResolver,
    limiter: RateLimiter,
    http: httpx.Client | None = None,
    clock: Callable[[], datetime] = utcnow,
    name: str | None = None,
    **options: Any,
) -> Provider:
    """A provider for ``record_or_spec`` (``ProviderRecord`` or ``HttpProviderSpec`` with ``name=``).

    ``options`` go to the implementation (``timeout``, ``attempts``, ``sleep``, ``monotonic``).
    """
    provider_name, spec = _spec_of(record_or_spec, name)
    if isinstance(spec, OAuthClientProviderSpec):
        return OAuthClientProvider(provider_name, spec, resolve=resolve, limiter=limiter, http=http, clock=clock, **options)
    if spec.kind == "http":
        return HttpProvider(provider_name, spec, resolve=resolve, limiter=limiter, http=http, clock=clock, **options)
    raise ConfigError(f"provider {provider_name!r}: unknown kind {spec.kind!r} (known: {', '.join(PROVIDER_KINDS)})")


ProviderBuilder = Callable[[Any], Provider]


def provider_builder(resolve: SecretResolver, limiter: RateLimiter) -> ProviderBuilder:
    """The one way keyrotor builds providers from applied records (``ProviderRecord``): the
    workers' context, the reconciler and the demo all take theirs from here, with their own
    secret resolver and rate limiter."""

    def build(record: Any) -> Provider:
        return build_provider(record, resolve=resolve, limiter=limiter)

    return build
