"""Providers: the plugin interface (``base``), the generic HTTP provider (``http``), the shared
rate limiter (``ratelimit``) and ``build_provider`` (``registry``)."""

from worker.providers.base import CheckOutcome, IssuedCredential, Provider, ProviderKeyInfo, issued_name, wait_until_live

__all__ = ["CheckOutcome", "IssuedCredential", "Provider", "ProviderKeyInfo", "issued_name", "wait_until_live"]
