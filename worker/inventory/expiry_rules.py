"""``config check``: a key whose expiry is known must not lose it at its first rotation.

A key that declares ``expires_at`` expires; if neither the provider's issue answer
(``calls.issue.response.expires_at``, the type's own issue call first) nor the credential type's
``lifetime`` says when its *next* credential expires, keyrotor cannot know after the first
rotation (the key in use has no recorded issue time to carry a lifetime forward from), and the
key falls back to ``max_age``: for a key that expires monthly, an outage. Works on plain data,
like ``reference_problems``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _issue_reads_expiry(provider: Mapping[str, Any], ctype: Mapping[str, Any]) -> bool:
    for calls in (ctype.get("calls"), provider.get("calls")):
        issue = calls.get("issue") if isinstance(calls, Mapping) else None
        if isinstance(issue, Mapping):
            response = issue.get("response")
            return isinstance(response, Mapping) and bool(response.get("expires_at"))
    return False


def lost_expiry_problems(providers: Mapping[str, Any], keys: Mapping[str, Any]) -> list[tuple[tuple[str | int, ...], str]]:
    problems: list[tuple[tuple[str | int, ...], str]] = []
    for kname, key in keys.items():
        if not isinstance(key, Mapping) or not key.get("expires_at"):
            continue
        pname, tname = key.get("provider"), key.get("credential_type")  # any YAML value: a name is a string
        provider = providers.get(pname) if isinstance(pname, str) else None
        types = provider.get("credential_types") if isinstance(provider, Mapping) else None
        ctype = types.get(tname) if isinstance(types, Mapping) and isinstance(tname, str) else None
        if (not isinstance(provider, Mapping) or not isinstance(ctype, Mapping) or ctype.get("lifetime")
                or _issue_reads_expiry(provider, ctype)):
            continue
        problems.append((("keys", kname, "expires_at"),
                         f"this key expires, but neither the issue answer (response.expires_at) nor credential type "
                         f"{key.get('credential_type')!r} (lifetime) says when its next credential will: after the first "
                         "rotation keyrotor would not know; declare 'lifetime' on the credential type (e.g. 30d)"))
    return problems


__all__ = ["lost_expiry_problems"]
