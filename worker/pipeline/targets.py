"""Which credential type a rotation issues, whoever asked for it.

Every producer (CLI ``rotate [--to TYPE]``, queue messages, emergencies, the scheduler, the 434
and liveness jobs) goes through ``request_rotation``, which asks ``rotation_target``:

- a type named explicitly (``--to``, ``target_credential_type``) must be one the provider
  declares and one it still issues; naming the key's own type is the same as naming none;
- otherwise a key whose type the provider no longer issues (any deprecation phase has started)
  moves to the type's ``replacement`` by itself, following a chain of replacements (each
  deprecated in turn) to the first type still issued; without a replacement the type is kept and
  the issue step says what to declare.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Mapping, Optional

from worker.errors import PermanentError
from worker.inventory.provider_parts import CredentialTypeSpec


class UnknownTargetType(PermanentError):
    """The requested credential type is not one the provider declares, or it no longer issues it."""


def _types(provider_spec: Any) -> Mapping[str, Any]:
    types = (provider_spec or {}).get("credential_types") if isinstance(provider_spec, Mapping) else None
    return types if isinstance(types, Mapping) else {}


def _spec(types: Mapping[str, Any], name: str) -> Optional[CredentialTypeSpec]:
    raw = types.get(name)
    return CredentialTypeSpec.model_validate(raw) if isinstance(raw, Mapping) else None


def rotation_target(*, provider: str, provider_spec: Any, current_type: str, requested: Optional[str],
                    now: datetime) -> Optional[str]:
    """The type the run issues when it differs from ``current_type`` (None: the same type)."""
    types = _types(provider_spec)
    if requested is not None and requested != current_type:
        if requested not in types:
            known = ", ".join(sorted(types)) or "none declared"
            raise UnknownTargetType(f"provider {provider!r} has no credential type {requested!r} (known: {known}); "
                                    "declare it under credential_types in the inventory and `keyrotor config apply`")
        spec = _spec(types, requested)
        phase = spec.phase_at(now) if spec is not None else None
        if phase is not None:
            instead = f"; rotate to {spec.replacement!r} instead" if spec and spec.replacement else ""
            raise UnknownTargetType(f"provider {provider!r} no longer issues {requested!r} credentials (deprecation "
                                    f"phase {phase.phase} since {phase.from_.date().isoformat()}){instead}")
        return requested
    target, seen = current_type, {current_type}
    while True:
        spec = _spec(types, target)
        if spec is None or spec.can_issue_at(now) or not spec.replacement or spec.replacement in seen:
            break
        target = spec.replacement
        seen.add(target)
    return None if target == current_type else target


def rejected_at(provider_spec: Any, credential_type: str, now: datetime) -> bool:
    """Whether the provider rejects every credential of ``credential_type`` at ``now`` (its
    ``rejected`` phase has started): such a credential can never authenticate again, so there
    is nothing left to revoke (Alloy's old keys after 26 January 2023)."""
    spec = _spec(_types(provider_spec), credential_type)
    phase = spec.phase_at(now) if spec is not None else None
    return phase is not None and phase.phase == "rejected"
