"""The parts of a declared request the generic HTTP provider fills in at send time: secret
references inside headers, query, form and JSON bodies, and error matchers over an answer.

Every secret value read here is also remembered in a ``Revealed`` set for the request, so that text
taken from the provider's answer (a vendor's error message shown to the user) can be scrubbed of
anything the request carried before it reaches an exception, a log line or the database.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from worker.errors import (
    ConfigError,
    DeprecatedCredential,
    InvalidCredential,
    KeyrotorError,
    PermanentError,
    RateLimited,
    TransientError,
)
from worker.inventory.error_matchers import ErrorMatcherSpec
from worker.inventory.field_types import is_ref_shaped
from worker.providers.jsonpath import JsonPathError, extract
from worker.providers.templating import render
from worker.secret import Secret
from worker.secret_refs import SecretRef, SecretResolver

#: Longest vendor message shown (a proxy's HTML page is not a message).
MESSAGE_LIMIT = 300
_REDACTED = "[REDACTED]"


class Revealed:
    """The secret values one request carries (to scrub answers of them)."""

    def __init__(self) -> None:
        self._values: set[str] = set()

    def add(self, value: str) -> str:
        if value:
            self._values.add(value)
        return value

    def scrub(self, text: str) -> str:
        for value in sorted(self._values, key=len, reverse=True):
            if len(value) >= 4:
                text = text.replace(value, _REDACTED)
        return text


def resolve_ref(ref: SecretRef, variables: Mapping[str, Any], resolve: SecretResolver) -> Secret:
    """Read a reference; placeholders in a Vault path (``users/{labels[user]}#password``) are
    filled in from the call's variables first."""
    if ref.vault is not None and "{" in ref.vault:
        try:
            ref = SecretRef(vault=render(ref.vault, {k: v for k, v in variables.items() if not isinstance(v, Secret)}))
        except ValueError as exc:  # a label whose value cannot be part of a Vault path
            raise ConfigError(f"secret reference vault:{ref.vault}: {exc}") from None
    return resolve(ref)


def key_variables(labels: Mapping[str, str]) -> dict[str, Any]:
    """What a per-key reference's Vault path may name, as a call sees it: the key's labels."""
    return {"labels": dict(labels)}


def fill(value: Any, variables: Mapping[str, Any], resolve: SecretResolver, revealed: Revealed) -> Any:
    """A template value with placeholders rendered and secret references replaced by their value."""
    if isinstance(value, SecretRef):
        return revealed.add(resolve_ref(value, variables, resolve).reveal())
    if isinstance(value, str):
        for secret in _secrets_in(variables):
            revealed.add(secret)
        return render(value, variables)
    if isinstance(value, Mapping):
        if is_ref_shaped(value):
            return revealed.add(resolve_ref(SecretRef.model_validate(dict(value)), variables, resolve).reveal())
        return {render(str(k), variables): fill(v, variables, resolve, revealed) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, variables, resolve, revealed) for v in value]
    return value


def _secrets_in(variables: Mapping[str, Any]) -> list[str]:
    """The secret values a rendered template may contain (the credential, captured values)."""
    found = [v.reveal() for v in variables.values() if isinstance(v, Secret)]
    captured = variables.get("captured")
    if isinstance(captured, Mapping):
        found += [v.reveal() for v in captured.values() if isinstance(v, Secret)]
    return found


def vendor_message(response: httpx.Response, matcher: ErrorMatcherSpec, revealed: Revealed) -> str:
    """The vendor's words for a matched answer: the JSON path ``message`` points at, else the
    matched text; scrubbed of the request's secrets and cut to a readable length."""
    text: Any = None
    if matcher.message:
        try:
            text = extract(response.json(), matcher.message)
        except (ValueError, UnicodeDecodeError, JsonPathError):
            text = None
    if not isinstance(text, str) or not text.strip():
        text = matcher.body_contains or ""
    text = revealed.scrub(" ".join(str(text).split()))
    return text[:MESSAGE_LIMIT] + ("…" if len(text) > MESSAGE_LIMIT else "")


def matched_error(matcher: ErrorMatcherSpec, where: str, message: str, retry_after: float | None) -> KeyrotorError | None:
    """The exception a matched answer raises (None: the answer counts as a success)."""
    said = f'{where}: "{message}"' if message else where
    hint = f"; {matcher.hint}" if matcher.hint else ""
    outcome = matcher.outcome
    if outcome == "success":
        return None
    if outcome == "configuration":
        return ConfigError(f"{said} (a configuration problem at the provider or in keyrotor's setup; not retried{hint})")
    if outcome == "permanent":
        return PermanentError(f"{said} (not retried{hint})")
    if outcome == "invalid":
        return InvalidCredential(f"{said} (the credential was rejected{hint})")
    if outcome == "deprecated":
        return DeprecatedCredential(f"{said} (the credential type is deprecated at the provider{hint})")
    if outcome == "rate_limited":
        return RateLimited(f"{said} (rate limited{hint})", retry_after=retry_after)
    return TransientError(f"{said} (retried later{hint})", retry_after=retry_after)


__all__ = ["MESSAGE_LIMIT", "Revealed", "fill", "key_variables", "matched_error", "resolve_ref", "vendor_message"]
