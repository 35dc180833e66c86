"""The inventory schema: the example passes, each validation rule refuses what it should."""

from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from pydantic_core import PydanticCustomError

from worker.inventory.field_types import parse_duration, template_placeholders
from worker.inventory.provider_parts import CredentialTypeSpec
from worker.inventory.schema import Inventory
from worker.text import key_slug
from worker.secret_refs import SecretRef

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "keyrotor.example.yaml"


@pytest.fixture
def doc() -> dict[str, Any]:
    return copy.deepcopy(yaml.safe_load(EXAMPLE.read_text()))


def errors(data: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    with pytest.raises(ValidationError) as info:
        Inventory.model_validate(data)
    return [(e["loc"], e["msg"]) for e in info.value.errors()]


def test_example_validates_and_resolves_policies(doc: dict[str, Any]) -> None:
    inv = Inventory.model_validate(doc)
    assert inv.summary() == "4 providers, 5 keys, 4 integrations"
    billing = inv.keys["alloy/billing"]
    policy = inv.policy_for(billing)
    assert policy.grace_period == timedelta(minutes=30)      # key override
    assert policy.max_age == timedelta(days=30)              # from short-lived
    assert policy.expiry_lead_time == timedelta(days=3)
    auth = inv.providers["alloy"].auth
    assert auth is not None and auth.type == "bearer" and auth.token == SecretRef(vault="secret/keyrotor/providers/alloy#admin_token")
    assert inv.providers["alloy"].calls.verify.auth.token == "{secret}"  # type: ignore[union-attr]
    assert inv.integrations["billing-app-copy"].kind == "vault_copy"


def test_normalised_json_revalidates_identically(doc: dict[str, Any]) -> None:
    inv = Inventory.model_validate(doc)
    dumped = inv.model_dump(mode="json", by_alias=True)
    assert dumped["policies"]["standard"]["max_age"] == 90 * 86400
    assert Inventory.model_validate(dumped) == inv


@pytest.mark.parametrize(
    "value,seconds",
    [(90, 90), ("90", 90), ("90s", 90), ("15m", 900), ("12h", 43200), ("7d", 604800), ("2w", 1209600), ("1h30m", 5400)],
)
def test_durations(value: Any, seconds: int) -> None:
    assert parse_duration(value) == timedelta(seconds=seconds)


@pytest.mark.parametrize("value", ["3 days", "7x", "-5s", True, 1.5, "", None])
def test_bad_durations_are_refused(value: Any) -> None:
    with pytest.raises(PydanticCustomError):
        parse_duration(value)


@pytest.mark.parametrize(
    "path,value",
    [
        (("providers", "alloy", "auth", "token"), "sk_live_abcdef"),
        (("providers", "workfront", "calls", "issue", "before", 0, "form", "password"), "hunter2-correct-horse"),
        (("integrations", "mesh-workflows", "signing_secret"), "whsec_123"),
        (("providers", "alloy", "calls", "verify", "auth", "token"), "a-real-token"),
    ],
)
def test_literal_secrets_are_refused(doc: dict[str, Any], path: tuple[Any, ...], value: str) -> None:
    node = doc
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    found = errors(doc)
    assert any("a literal secret is not allowed here" in msg and '{vault: "MOUNT/PATH#FIELD"}' in msg for _, msg in found), found
    assert not any(value in msg for _, msg in found), "the refused value must not be echoed"


def test_key_specific_secret_template_only_where_a_secret_may_be(doc: dict[str, Any]) -> None:
    doc["integrations"]["mesh-workflows"]["signing_secret"] = "{secret}"
    assert any("literal secret" in m for _, m in errors(doc))


def test_unknown_fields_are_refused(doc: dict[str, Any]) -> None:
    doc["keys"]["alloy/billing"]["grace"] = "1h"
    doc["providers"]["alloy"]["calls"]["rotate"] = {"url": "{base_url}/x"}
    locs = [loc for loc, _ in errors(doc)]
    assert ("keys", "alloy/billing", "grace") in locs
    assert ("providers", "alloy", "calls", "rotate") in locs


@pytest.mark.parametrize(
    "mode,remove,missing",
    [("overlap", "revoke", "revoke"), ("cutover", "issue", "issue"), ("assisted", "verify", "verify")],
)
def test_each_mode_needs_its_calls(doc: dict[str, Any], mode: str, remove: str, missing: str) -> None:
    provider = {"overlap": "alloy", "cutover": "workfront", "assisted": "asana"}[mode]
    del doc["providers"][provider]["calls"][remove]
    found = errors(doc)
    assert any(loc[:3] == ("providers", provider, "calls") and f"'{missing}' is missing" in msg for loc, msg in found), found


def test_assisted_mode_needs_no_issue_call(doc: dict[str, Any]) -> None:
    assert "issue" not in doc["providers"]["asana"]["calls"]
    Inventory.model_validate(doc)


def test_verify_must_use_the_credential(doc: dict[str, Any]) -> None:
    del doc["providers"]["alloy"]["calls"]["verify"]["auth"]
    assert any(loc == ("providers", "alloy", "calls", "verify") for loc, _ in errors(doc))


def test_unknown_url_placeholder(doc: dict[str, Any]) -> None:
    doc["providers"]["alloy"]["calls"]["revoke"]["url"] = "{base_url}/api/api-key/{keyid}"
    found = errors(doc)
    assert (("providers", "alloy", "calls", "revoke", "url"), found[0][1]) in found
    assert "unknown placeholder {keyid}" in found[0][1]


def test_placeholders_in_body_and_labels(doc: dict[str, Any]) -> None:
    assert template_placeholders("{base_url}/u/{labels[workfront_user]}") == ["base_url", "labels"]
    doc["providers"]["alloy"]["calls"]["issue"]["body"] = {"name": "{key_name}", "nested": ["{password}"]}
    assert any("unknown placeholder {password}" in m for _, m in errors(doc))


@pytest.mark.parametrize(
    "path,value,needle",
    [
        (("keys", "alloy/billing", "provider"), "nope", "unknown provider 'nope'"),
        (("keys", "alloy/billing", "credential_type"), "pat", "has no credential type 'pat'"),
        (("keys", "alloy/billing", "policy"), "weekly", "unknown policy 'weekly'"),
        (("providers", "asana", "credential_types", "api_key", "replacement"), "oauth", "unknown credential type 'oauth'"),
    ],
)
def test_references_must_exist(doc: dict[str, Any], path: tuple[str, ...], value: str, needle: str) -> None:
    node = doc
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    found = errors(doc)
    assert any(loc == path and needle in msg for loc, msg in found), found


def test_unknown_integration_reference(doc: dict[str, Any]) -> None:
    doc["keys"]["alloy/reporting"]["integrations"] = ["reporting-service", "nowhere"]
    assert (("keys", "alloy/reporting", "integrations", 1)) in [loc for loc, _ in errors(doc)]


def test_cutoff_without_replacement_is_refused(doc: dict[str, Any]) -> None:
    del doc["providers"]["asana"]["credential_types"]["api_key"]["replacement"]
    assert any("needs a 'replacement'" in m for _, m in errors(doc))


def test_aware_datetimes_only(doc: dict[str, Any]) -> None:
    doc["keys"]["workfront/integration-user"]["expires_at"] = "2026-12-20T00:00:00"
    assert any(loc == ("keys", "workfront/integration-user", "expires_at") for loc, _ in errors(doc))


def test_deprecation_phases_must_be_ordered(doc: dict[str, Any]) -> None:
    phases = doc["providers"]["asana"]["credential_types"]["api_key"]["deprecation"]
    phases[1]["from"] = "2015-06-01T00:00:00Z"   # amnesty before no_new_credentials
    assert any("in order" in m for _, m in errors(doc))


def _asana_type() -> CredentialTypeSpec:
    return CredentialTypeSpec.model_validate({
        "replacement": "personal_access_token",
        "deprecation": [
            {"phase": "no_new_credentials", "from": "2016-01-01T00:00:00Z"},
            {"phase": "amnesty", "from": "2017-01-01T00:00:00Z", "headers": {"Asana-Amnesty-Api-Key": True}},
            {"phase": "rejected", "from": "2017-02-01T00:00:00Z"},
        ],
    })


def at(*args: int) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)  # type: ignore[misc]


def test_phase_at_and_cutoffs() -> None:
    ct = _asana_type()
    assert ct.phase_at(at(2015, 12, 31)) is None
    assert ct.phase_at(at(2016, 6, 1)).phase == "no_new_credentials"  # type: ignore[union-attr]
    amnesty = ct.phase_at(at(2017, 1, 15))
    assert amnesty is not None and amnesty.phase == "amnesty" and amnesty.headers == {"Asana-Amnesty-Api-Key": "true"}
    assert ct.headers_at(at(2017, 1, 15)) == {"Asana-Amnesty-Api-Key": "true"}
    assert ct.headers_at(at(2017, 3, 1)) == {}
    assert ct.phase_at(at(2017, 3, 1)).phase == "rejected"  # type: ignore[union-attr]
    assert ct.first_cutoff() == at(2017, 1, 1)
    assert ct.next_cutoff(at(2016, 6, 1)) == at(2017, 1, 1)      # no_new_credentials is not a cutoff
    assert ct.next_cutoff(at(2017, 1, 15)) == at(2017, 2, 1)
    assert ct.next_cutoff(at(2017, 3, 1)) is None
    assert ct.can_issue_at(at(2015, 1, 1)) and not ct.can_issue_at(at(2016, 1, 2))


def test_rotation_target_is_the_replacement_once_deprecated(doc: dict[str, Any]) -> None:
    asana = Inventory.model_validate(doc).providers["asana"]
    assert asana.rotation_target("api_key", at(2015, 1, 1)) == "api_key"
    assert asana.rotation_target("api_key", at(2016, 2, 1)) == "personal_access_token"
    assert asana.rotation_target("personal_access_token", at(2020, 1, 1)) == "personal_access_token"


def test_notification_url_literal_or_reference(doc: dict[str, Any]) -> None:
    inv = Inventory.model_validate(doc)
    assert isinstance(inv.notifications[0].url, SecretRef)
    assert inv.notifications[1].url == "https://alerts.internal.example/keyrotor"
    assert inv.notifications[0].wants("failed") and not inv.notifications[0].wants("succeeded")
    doc["notifications"][1]["url"] = "not a url"
    assert any(loc[:2] == ("notifications", 1) for loc, _ in errors(doc))


def test_key_slug() -> None:
    assert key_slug("alloy/billing") == "alloy-billing"
    assert key_slug("Workfront/Integration User") == "workfront-integration-user"


def test_credential_headers_need_a_placeholder(doc: dict[str, Any]) -> None:
    doc["providers"]["alloy"]["calls"]["issue"]["headers"] = {"Authorization": "Bearer sk_live_abc"}
    found = errors(doc)
    assert found == [(("providers", "alloy", "calls", "issue", "headers", "Authorization"),
                      "header Authorization would carry a literal credential; use the call's 'auth' "
                      "with a secret reference, or the {secret} placeholder")]
    doc["providers"]["alloy"]["calls"]["issue"]["headers"] = {"Authorization": "Bearer {secret}", "X-Trace": "static"}
    Inventory.model_validate(doc)

