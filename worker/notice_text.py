"""The wording of notices to a key's owner (assisted mode): headline, subject, plain text, and the
detail of a deposit request. Pure functions: ``worker.notify`` renders email and Slack notices with
them, ``worker.owner_notices`` builds the deposit detail."""

from __future__ import annotations

from typing import Any, Optional

HEADLINES = {
    "deposit_requested": "a new credential is needed from you",
    "deposit_reminder": "reminder: a new credential is still needed from you",
    "deposit_rejected": "the credential you deposited does NOT work; it was destroyed, deposit another",
    "deposit_accepted": "thank you: the credential you deposited works and is being rolled out",
    "revoke_requested": "please revoke the old credential at the provider",
    "needs_attention": "the rotation NEEDS ATTENTION: an operator has been alerted",
    "succeeded": "rotation completed",
}


def deposit_command(mount: str, path: str) -> str:
    """The Vault CLI command an owner runs (the value comes from stdin, never argv)."""
    return f"vault kv put -mount={mount} {path} credential=- deposited_by=<your name>"


def deposit_detail(*, provider: str, credential_type: str, owner: str, contact: Optional[str], mount: str,
                   path: str, create_url: Optional[str], run_id: str, deadline_at: Optional[str] = None,
                   **extra: Any) -> dict[str, Any]:
    """The detail of a deposit notice: what to create, where, how to hand it over."""
    detail: dict[str, Any] = {
        "provider": provider, "credential_type": credential_type, "owner": owner, "contact": contact,
        "create_at": create_url,
        "next_step": (f"create a new {credential_type} at {provider}"
                      + (f" ({create_url})" if create_url else "")
                      + f", then write it to Vault: {deposit_command(mount, path)}"),
        "deposit": {"mount": mount, "path": path, "command": deposit_command(mount, path),
                    "fields": "credential (required), deposited_by (your name, recorded in the audit trail)"},
        "operator_command": f"keyrotor deposit {run_id} --as <your name>  (operators only)",
        "deadline_at": deadline_at,
    }
    detail.update(extra)
    return detail


def notice_subject(payload: dict[str, Any]) -> str:
    detail = payload.get("detail") or {}
    return f"keyrotor: {payload['key']} ({detail.get('provider', '?')} {detail.get('credential_type', '?')}): " \
           f"{HEADLINES.get(payload['event'], payload['event'])}"


def notice_text(payload: dict[str, Any]) -> str:
    """Plain text for Slack and email: headline, what, next step, how to hand over, deadline."""
    detail = payload.get("detail") or {}
    lines = [f"keyrotor: {HEADLINES.get(payload['event'], payload['event'])}",
             f"key: {payload['key']}   provider: {detail.get('provider', '?')}   "
             f"credential type: {detail.get('credential_type', '?')}"]
    if payload.get("run_id"):
        lines.append(f"run: {payload['run_id']}")
    for label, name in (("why", "reason"), ("next step", "next_step"), ("create it at", "create_at"),
                        ("hand it over", "deposit_command"), ("deadline", "deadline_at"),
                        ("old credential", "old_fingerprint")):
        value = detail.get(name)
        if name == "deposit_command":
            value = (detail.get("deposit") or {}).get("command") if isinstance(detail.get("deposit"), dict) else None
        if value:
            lines.append(f"{label}: {value}")
    return "\n".join(lines)
