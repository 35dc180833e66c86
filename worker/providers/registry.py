"""``build_provider``: an inventory provider spec (or its DB record) → a ready ``Provider``.

New provider kinds join here with their own module; the generic HTTP provider is the only one.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Callable

import httpx
from pydantic import ValidationError

from worker.clock import utcnow
from worker.errors import ConfigError
from worker.inventory.schema import HttpProviderSpec
from worker.providers.base import Provider
from worker.providers.http import HttpProvider
from worker.providers.ratelimit import RateLimiter
from worker.secret_refs import SecretResolver


def _spec_of(record_or_spec: Any, name: str | None) -> tuple[str, HttpProviderSpec]:
    if isinstance(record_or_spec, HttpProviderSpec):
        if not name:
            raise ConfigError("build_provider: pass name= with a bare provider spec")
        return name, record_or_spec
    spec_data = getattr(record_or_spec, "spec", None)
    record_name = getattr(record_or_spec, "name", None) or name
    if not isinstance(spec_data, dict) or not record_name:
        raise ConfigError(f"build_provider: expected an HttpProviderSpec or a provider record, got {type(record_or_spec).__name__}")
    try:
        return record_name, HttpProviderSpec.model_validate(spec_data)
    except ValidationError as exc:
        raise ConfigError(f"provider {record_name!r}: stored spec is invalid ({exc.error_count()} errors; re-run `keyrotor config apply`)") from None


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
    if spec.kind == "http":
        return HttpProvider(provider_name, spec, resolve=resolve, limiter=limiter, http=http, clock=clock, **options)
    raise ConfigError(f"provider {provider_name!r}: unknown kind {spec.kind!r} (known: http)")
