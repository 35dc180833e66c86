"""worker/adoption.py without services: matching a provider's key hint, and which providers
revoke by id (so a key without a known id could never be revoked)."""

from __future__ import annotations

from worker.adoption import hint_matches, revoke_needs_key_id
from worker.db.models import ProviderRecord
from worker.secret import Secret

KEY = Secret("sk_live_a1b2c3d4e5f6g7h8")


def test_hint_matches_prefix_and_suffix_around_an_ellipsis() -> None:
    assert hint_matches("sk_l…g7h8", KEY)
    assert hint_matches("...g7h8", KEY)
    assert hint_matches("sk_live_a1b2****", KEY)
    assert not hint_matches("sk_l…0000", KEY)
    assert not hint_matches("…h8", KEY)          # too little to tell keys apart
    assert hint_matches("sk_live_a1", KEY) and not hint_matches("sk_l", KEY)


def _record(mode: str, revoke: dict | None) -> ProviderRecord:
    calls = {"verify": {"url": "{base_url}/me"}}
    if revoke is not None:
        calls["revoke"] = revoke
    return ProviderRecord(name="p", kind="http", mode=mode, spec={"calls": calls})


def test_revoke_needs_key_id_reads_the_revoke_call_templates() -> None:
    assert revoke_needs_key_id(_record("overlap", {"method": "DELETE", "url": "{base_url}/api/api-key/{key_id}"}))
    assert revoke_needs_key_id(_record("overlap", {"method": "POST", "url": "{base_url}/revoke", "body": {"id": "{key_id}"}}))
    assert not revoke_needs_key_id(_record("overlap", {"method": "POST", "url": "{base_url}/revoke", "body": {"key": "{secret}"}}))
    assert not revoke_needs_key_id(_record("overlap", None))
    assert not revoke_needs_key_id(_record("cutover", {"url": "{base_url}/api/api-key/{key_id}"}))
    assert not revoke_needs_key_id(None)
