"""`keyrotor config check` on the oauth_client provider kind: the example's OAuth client is valid,
and each mistake is one FILE:LINE error naming the field and what to write instead."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from worker.cli import main as cli_main
from worker.inventory.loader import load_inventory
from worker.inventory.oauth_schema import OAuthClientProviderSpec

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "keyrotor.example.yaml"
TEXT = EXAMPLE.read_text()


@pytest.fixture
def runner() -> CliRunner:
    cli_main._register()
    return CliRunner()


def line_of(text: str, needle: str) -> int:
    """The 1-based line of the first ``needle`` inside the OAuth provider's entry."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  partner-oauth:"))
    hits = [i + 1 for i, line in enumerate(lines) if i >= start and needle in line]
    assert hits, f"{needle!r} not in text"
    return hits[0]


def check(runner: CliRunner, tmp_path: Path, text: str) -> tuple[int, str, Path]:
    path = tmp_path / "inventory.yaml"
    path.write_text(text)
    result = runner.invoke(cli_main.app, ["config", "check", str(path)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output, path


def test_the_example_declares_an_oauth_client_with_both_credential_types() -> None:
    provider = load_inventory(EXAMPLE).providers["partner-oauth"]
    assert isinstance(provider, OAuthClientProviderSpec)
    assert set(provider.credential_types) == {"private_key_jwt", "client_secret"}
    assert provider.assertion_audience == provider.token_url and provider.mode == "overlap"


@pytest.mark.parametrize(("old", "new", "at", "path", "message"), [
    ("      private_key_jwt: {}\n      client_secret: {}\n", "      private_key_jwt: {}\n      api_key: {}\n",
     "api_key: {}", "providers.partner-oauth.credential_types.api_key",
     "an oauth_client has the credential types private_key_jwt and client_secret; 'api_key' is not one"),
    ('        remove_jwk: {method: DELETE, url: "{base_url}/clients/{client_id}/jwks/{key_id}"}\n', "",
     "      calls:", "providers.partner-oauth.admin.calls",
     "credential type private_key_jwt needs the admin calls add_jwk, list_jwks, remove_jwk; 'remove_jwk' is missing"),
    ('body: {jwk: "{jwk}", name: "{key_name}", expires_at: "{expires_at}"}', 'body: {name: "{key_name}"}',
     'body: {name: "{key_name}"}', "providers.partner-oauth.admin.calls.add_jwk.body",
     'needs "{jwk}" or "{public_key_pem}" somewhere in the body'),
    ('url: "{base_url}/clients/{client_id}/jwks/{key_id}"}', 'url: "{base_url}/clients/{client_id}/jwks/{kid}"}',
     "jwks/{kid}", "providers.partner-oauth.admin.calls.remove_jwk.url", "unknown placeholder {kid}"),
    ('auth: {type: bearer, token: {vault: "secret/keyrotor/providers/partner-oauth#admin_token"}}',
     'auth: {type: bearer, token: "{secret}"}', 'token: "{secret}"', "providers.partner-oauth.admin.auth",
     "the admin API authenticates with a management credential"),
    ("    scopes: [read:reports]", '    scopes: ["read reports"]', 'scopes: ["read reports"]',
     "providers.partner-oauth.scopes", "'read reports' is not a scope token"),
    ("token_url: https://auth.partner.example/oauth/token", "token_url: http://auth.partner.example/oauth/token",
     "token_url: http://auth", "providers.partner-oauth.token_url", "http://"),
    ('response: {items: "$.keys", key_id: "$.kid", name: "$.name", created_at: "$.created_at"}',
     'response: {items: "$.keys", key_id: "$.kid"}', 'response: {items: "$.keys", key_id: "$.kid"}',
     "providers.partner-oauth.admin.calls.list_jwks.response", "needs response.key_id and response.name"),
    ("    key_pair: {algorithm: RS256, rsa_bits: 2048}", "    key_pair: {algorithm: HS256}", "algorithm: HS256",
     "providers.partner-oauth.key_pair.algorithm", "RS256"),
    ("    scopes: [read:reports]\n", "    scopes: [read:reports]\n    token_params: {scope: admin}\n", "token_params:",
     "providers.partner-oauth.token_params", "scope is set by keyrotor itself"),
    ("    scopes: [read:reports]\n", "    scopes: [read:reports]\n    token_params: {client_secret_extra: x}\n",
     "token_params:", "providers.partner-oauth.token_params", "token parameter client_secret_extra looks like it holds"),
])
def test_each_mistake_is_one_file_line_error(runner: CliRunner, tmp_path: Path, old: str, new: str, at: str,
                                             path: str, message: str) -> None:
    assert old in TEXT
    text = TEXT.replace(old, new, 1)
    code, output, file = check(runner, tmp_path, text)
    assert code == 2, output
    line = line_of(text, at)
    first = output.splitlines()[0]
    assert first.startswith(f"{file}:{line}: {path}: "), output
    assert message in first, output
    assert "Traceback" not in output


def test_token_params_go_into_the_token_request_next_to_what_keyrotor_sets() -> None:
    import httpx

    from worker.providers.oauth_client import OAuthClientProvider
    from worker.providers.oauth_keys import generate_key_pair
    from worker.providers.ratelimit import InMemoryRateLimiter

    seen: list[dict[str, str]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/token"):
            from urllib.parse import parse_qsl

            seen.append(dict(parse_qsl(request.content.decode())))
            return httpx.Response(200, json={"access_token": "t", "token_type": "Bearer", "expires_in": 60})
        return httpx.Response(200, json={})

    spec = load_inventory(EXAMPLE).providers["partner-oauth"]
    assert isinstance(spec, OAuthClientProviderSpec)
    spec = spec.model_copy(update={"token_params": {"audience": "https://api.partner.example"}})
    oauth = OAuthClientProvider("partner-oauth", spec, resolve=lambda ref: None, limiter=InMemoryRateLimiter(),  # type: ignore[arg-type,return-value]
                                http=httpx.Client(transport=httpx.MockTransport(answer)))
    assert oauth.check(generate_key_pair("RS256").private_pem, credential_type="private_key_jwt").value == "valid"
    assert seen[0]["audience"] == "https://api.partner.example" and seen[0]["grant_type"] == "client_credentials"
    assert seen[0]["scope"] == "read:reports" and seen[0]["client_assertion"].count(".") == 2


@pytest.mark.parametrize(("credential_type", "needed"), [("client_secret", True), ("private_key_jwt", False)])
def test_a_rotation_needs_the_old_secret_s_id_but_a_private_key_s_kid_follows_from_the_key(
        credential_type: str, needed: bool) -> None:
    from worker.adoption import revoke_needs_key_id
    from worker.db.models import ProviderRecord

    record = ProviderRecord(name="partner-oauth", kind="oauth_client", mode="overlap", spec={})
    assert revoke_needs_key_id(record, credential_type) is needed
