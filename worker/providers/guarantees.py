"""What keyrotor can promise about keys it may have minted without knowing it, per provider.

A provider with both a list and a revoke call is covered by the orphan scan and by the issue step's
look after a call with an unknown outcome: every key named after a run ends up current, previous in
grace, or revoked. Without a list call nothing can be found: an issue call whose answer was lost
(timeout, connection reset, 5xx) may have minted a key that stays valid. What is left then is that
every such call is recorded, with the key's name, as ``issue_outcome_unknown`` in the run's audit
trail, and ``plan``/``status`` say so, so a person can look for ``keyrotor-<run id>`` at the provider.
"""

from __future__ import annotations

from typing import Any, Optional

#: ``status``/``plan`` wording for a provider without a list call.
NO_LIST = ("no orphan scan (the provider has no list call): a key minted by an issue call whose answer was lost "
           "is not found or revoked automatically; each such call is in the run's audit as issue_outcome_unknown "
           "with the key's name (keyrotor-<run id>) to look for at the provider")
NO_REVOKE = ("no orphan scan (the provider has no revoke call): stray keys named keyrotor-<run id> must be revoked "
             "by a person")


def orphan_guard(record: Any) -> Optional[str]:
    """``None`` when keys minted under a run's name are always accounted for (list and revoke
    calls declared, or a provider kind that is not the generic HTTP one); else what is left."""
    if record is None or getattr(record, "kind", None) != "http" or getattr(record, "mode", None) == "assisted":
        return None
    calls = (getattr(record, "spec", None) or {}).get("calls") or {}
    if not calls.get("issue"):
        return None  # keyrotor never mints keys for it
    if not calls.get("list"):
        return NO_LIST
    if not calls.get("revoke"):
        return NO_REVOKE
    return None
