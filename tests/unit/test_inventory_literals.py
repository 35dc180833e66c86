"""Literal secrets in headers, URLs and notification URLs are refused by `config check`, located at
FILE:LINE: path, and the value is never echoed."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.inventory.literals import header_problem, looks_like_credential, url_problem
from worker.inventory.loader import check_text

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "keyrotor.example.yaml"

TOKEN = "a9Fq2LmX7vR4kT8zW1pN6yB3"                       # random-looking, no known prefix
SLACK = "https://hooks.slack.com/services/T0ABC1234/B0DEF5678/" + "Qw3rTy8uIoP1aSdFgHjK2lZx"


def problems_for(text: str) -> list[str]:
    _inventory, problems = check_text(text, "inv.yaml")
    return [p.format() for p in problems]


def provider_with(*, url: str = "{base_url}/api/api-key", headers: str = "", base_url: str = "https://api.example.com") -> str:
    return f"""\
version: 1
providers:
  alloy:
    kind: http
    base_url: "{base_url}"
    auth: {{type: bearer, token: {{env: ALLOY_ADMIN}}}}
    credential_types: {{api_key: {{}}}}
    calls:
      issue:
        method: POST
        url: "{url}"
        headers: {{{headers}}}
        response: {{secret: "$.apiKey"}}
      verify:
        url: "{{base_url}}/api/user/me"
        auth: {{type: bearer, token: "{{secret}}"}}
      revoke:
        method: DELETE
        url: "{{base_url}}/api/api-key/{{key_id}}"
"""


@pytest.mark.parametrize("headers, name", [
    (f'X-Api-Key: "{TOKEN}"', "X-Api-Key"),
    (f'X-Custom-Thing: "{TOKEN}"', "X-Custom-Thing"),                 # credential-shaped under any name
    ('X-Upstream: "Bearer live_9f8e7d6c5b4a"', "X-Upstream"),          # an Authorization-style value
    ('X-Session-Token: "s3ss10nvalue"', "X-Session-Token"),            # a secret-sounding name
    ('X-Gh: "ghp_0123456789abcdefghijABCDEFGHIJ"', "X-Gh"),
])
def test_literal_credentials_in_headers_are_refused_at_their_line(headers: str, name: str) -> None:
    text = provider_with(headers=headers)
    found = problems_for(text)
    assert len(found) == 1, found
    assert found[0].startswith(f"inv.yaml:12: providers.alloy.calls.issue.headers.{name}: header {name} ")
    value = headers.split(": ", 1)[1].strip('"')
    assert value not in found[0] and value.split()[-1] not in found[0]


@pytest.mark.parametrize("headers", [
    'Accept: application/json', 'X-Request-Id: "{run_id}"', 'Authorization: "Bearer {secret}"',
    'Asana-Enable: new_goal_memberships', 'X-Api-Version: "2023-01-01"', 'X-Feature-Token-Mode: "on"',
])
def test_ordinary_headers_pass(headers: str) -> None:
    assert problems_for(provider_with(headers=headers)) == []


@pytest.mark.parametrize("url, what", [
    ("{base_url}/api/api-key?api_token=" + TOKEN, "query parameter 'api_token'"),
    ("{base_url}/api/api-key?key=s3cr3tvalue1", "query parameter 'key'"),
    ("https://admin:pa55word99@api.example.com/api/api-key", "password"),
    ("{base_url}/hooks/" + TOKEN + "/api-key", "path segment"),
])
def test_literal_credentials_in_call_urls_are_refused(url: str, what: str) -> None:
    found = problems_for(provider_with(url=url))
    assert len(found) == 1 and found[0].startswith("inv.yaml:11: providers.alloy.calls.issue.url: ") and what in found[0]
    assert TOKEN not in found[0] and "pa55word99" not in found[0] and "s3cr3tvalue1" not in found[0]


def test_literal_credential_in_a_base_url_is_refused_without_echo() -> None:
    found = problems_for(provider_with(base_url="https://api.example.com/?api_key=" + TOKEN))
    assert len(found) == 1 and found[0].startswith("inv.yaml:5: providers.alloy.base_url: ") and TOKEN not in found[0]


@pytest.mark.parametrize("url", [
    "{base_url}/api/api-key", "{base_url}/check?api_token={secret}", "{base_url}/users/{key_id}?page=2&limit=100",
    "{base_url}/attask/api/v15.0/user/search?fields=ID", "{base_url}/orgs/8f14e45f-ceea-467f-a0e6-1e7e0c0a5b6f/keys",
])
def test_ordinary_urls_pass(url: str) -> None:
    assert problems_for(provider_with(url=url)) == []


@pytest.mark.parametrize("url", [
    SLACK,
    "https://discord.com/api/webhooks/123456789012345678/" + TOKEN,
    "https://contoso.webhook.office.com/webhookb2/abc@def/IncomingWebhook/" + TOKEN + "/x",
])
def test_incoming_webhook_urls_must_be_references(url: str) -> None:
    text = f"""\
version: 1
integrations:
  chat:
    kind: webhook
    url: "{url}"
    signing_secret: {{env: CHAT_SIGNING}}
notifications:
  - kind: slack
    url: "{url}"
"""
    found = problems_for(text)
    assert [f.split(": ", 2)[:2] for f in found] == [["inv.yaml:5", "integrations.chat.url"],
                                                     ["inv.yaml:9", "notifications[0].url"]], found
    assert all("webhook URL is itself a secret" in f and TOKEN not in f and "Qw3rTy8uIoP1aSdFgHjK2lZx" not in f
               for f in found)
    ok = text.replace(f'url: "{url}"\n    signing', 'url: "https://chat.internal.example/hook"\n    signing') \
        .replace(f'  - kind: slack\n    url: "{url}"', "  - kind: slack\n    url: {env: SLACK_WEBHOOK_URL}")
    assert problems_for(ok) == []


def test_the_example_inventory_still_passes() -> None:
    assert problems_for(EXAMPLE.read_text()) == []


def test_shape_detectors() -> None:
    assert looks_like_credential(TOKEN) and looks_like_credential("xoxb-1234567890-abcdefghij")
    assert not looks_like_credential("generateApiKey") and not looks_like_credential("2026-01-01T00:00:00Z")
    assert header_problem("Authorization", "Bearer {secret}") is None
    assert url_problem("{base_url}/x?token={secret}") is None
