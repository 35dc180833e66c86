"""The OAuth client provider (private-key JWT and client secrets) against the authorization server
stand-in over real HTTP: issue, check, revoke and list as the pipeline calls them, and the calls
whose answer is lost."""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from worker.errors import RateLimited, TransientError
from worker.inventory.oauth_schema import OAuthClientProviderSpec
from worker.providers.base import CheckOutcome, Provider, RevokeOutcome
from worker.providers.oauth_client import MissingScope, OAuthClientProvider
from worker.providers.oauth_keys import key_pair_from_pem
from worker.providers.ratelimit import InMemoryRateLimiter
from worker.providers.registry import build_provider
from keyrotor_sandbox.oauth_server import AuthServerHandle, standin_oauth_spec, start_auth_server_in_thread
from worker.secret_refs import make_resolver

pytestmark = pytest.mark.integration
CLIENT = "reporting-client"
ADMIN_ENV = "KR_TEST_OAUTH_ADMIN"


@pytest.fixture
def server() -> Iterator[AuthServerHandle]:
    handle = start_auth_server_in_thread(resource_scopes={"/api/reports": "read:reports"})
    handle.add_client(CLIENT, {"read:reports"})
    yield handle
    handle.stop()


def provider(server: AuthServerHandle, *, types: tuple[str, ...] = ("private_key_jwt", "client_secret"),
             **overrides: Any) -> OAuthClientProvider:
    overrides.setdefault("rate_limit", {"requests": 100, "per": "1s"})
    scopes = overrides.pop("scopes", ["read:reports"])
    data = standin_oauth_spec(server, client_id=CLIENT, scopes=scopes, scoped_path="/api/reports",
                              admin_token_ref={"env": ADMIN_ENV}, credential_types=types, **overrides)
    built = build_provider(OAuthClientProviderSpec.model_validate(data), name="partner-oauth",
                           resolve=make_resolver(None, {ADMIN_ENV: server.admin_token}),
                           limiter=InMemoryRateLimiter(max_wait=0.5), timeout=1.0, sleep=lambda _s: None)
    assert isinstance(built, OAuthClientProvider) and isinstance(built, Provider)
    return built


def test_a_key_pair_is_generated_its_jwk_registered_checked_and_removed(server: AuthServerHandle) -> None:
    oauth = provider(server)
    issued = oauth.issue(name="keyrotor-run1", credential_type="private_key_jwt", labels={})
    pem = issued.secret.reveal()
    assert pem.startswith("-----BEGIN PRIVATE KEY-----")
    assert issued.key_id == key_pair_from_pem(issued.secret, "RS256").kid   # kid = RFC 7638 thumbprint
    registered = server.client(CLIENT).jwks[issued.key_id]
    assert registered.name == "keyrotor-run1" and "d" not in registered.jwk  # only the public half left keyrotor
    assert oauth.check(issued.secret, credential_type="private_key_jwt") is CheckOutcome.valid
    assert oauth.check(issued.secret, credential_type="private_key_jwt") is CheckOutcome.valid  # fresh jti each time
    assert [(k.key_id, k.name) for k in oauth.list_keys()] == [(issued.key_id, "keyrotor-run1")]
    assert oauth.identify(issued.secret, credential_type="private_key_jwt") == (CheckOutcome.valid, issued.key_id)
    assert oauth.revoke(key_id=issued.key_id, secret=None, credential_type="private_key_jwt") is RevokeOutcome.revoked
    assert oauth.check(issued.secret, credential_type="private_key_jwt") is CheckOutcome.invalid
    assert oauth.revoke(key_id=issued.key_id, secret=None, credential_type="private_key_jwt") is RevokeOutcome.already_gone
    assert server.state.refusals == ["unknown kid"]


def test_es256_keys_work_too(server: AuthServerHandle) -> None:
    oauth = provider(server, key_pair={"algorithm": "ES256"})
    issued = oauth.issue(name="keyrotor-run2", credential_type="private_key_jwt", labels={})
    assert server.client(CLIENT).jwks[issued.key_id].jwk["kty"] == "EC"
    assert oauth.check(issued.secret, credential_type="private_key_jwt") is CheckOutcome.valid


def test_a_missing_scope_fails_the_check_naming_the_scope(server: AuthServerHandle) -> None:
    oauth = provider(server, scopes=["read:reports", "write:reports"])
    server.set_scopes(CLIENT, {"write:reports"})
    issued = oauth.issue(name="keyrotor-run3", credential_type="private_key_jwt", labels={})
    with pytest.raises(MissingScope) as missing:
        oauth.check(issued.secret, credential_type="private_key_jwt")
    assert missing.value.scopes == ["read:reports"]
    assert "lacks the scope 'read:reports'" in str(missing.value) and "granted: write:reports" in str(missing.value)
    assert issued.secret.reveal() not in str(missing.value)


def test_a_registration_that_timed_out_but_landed_is_found_by_kid_not_registered_twice(server: AuthServerHandle) -> None:
    oauth = provider(server)
    server.add_fault("add_jwk", after_effect_delay=1.5)  # registered, then answered after the 1 s client timeout
    issued = oauth.issue(name="keyrotor-run4", credential_type="private_key_jwt", labels={})
    assert list(server.client(CLIENT).jwks) == [issued.key_id]
    assert server.stats()["list_jwks"] == {"200": 1}
    assert oauth.check(issued.secret, credential_type="private_key_jwt") is CheckOutcome.valid


def test_a_registration_that_did_not_land_fails_as_transient(server: AuthServerHandle) -> None:
    oauth = provider(server)
    server.add_fault("add_jwk", status=503)
    with pytest.raises(TransientError):
        oauth.issue(name="keyrotor-run5", credential_type="private_key_jwt", labels={})
    assert server.client(CLIENT).jwks == {} and server.stats()["list_jwks"] == {"200": 1}


def test_a_rate_limited_registration_is_a_refusal_with_retry_after(server: AuthServerHandle) -> None:
    oauth = provider(server)
    server.add_fault("add_jwk", status=429, retry_after="7")
    with pytest.raises(RateLimited) as limited:
        oauth.issue(name="keyrotor-run6", credential_type="private_key_jwt", labels={})
    assert limited.value.retry_after == 7 and server.client(CLIENT).jwks == {}
    assert "list_jwks" not in server.stats()  # a 429 is a refusal: nothing to look for


def test_client_secret_rotation_with_two_active_secrets(server: AuthServerHandle) -> None:
    oauth = provider(server)
    seed = server.add_secret(CLIENT, name="seed")
    from worker.secret import Secret

    assert oauth.check(Secret(seed.value), credential_type="client_secret") is CheckOutcome.valid
    issued = oauth.issue(name="keyrotor-run7", credential_type="client_secret", labels={})
    assert issued.key_id in server.client(CLIENT).secrets
    assert oauth.check(issued.secret, credential_type="client_secret") is CheckOutcome.valid
    assert oauth.check(Secret(seed.value), credential_type="client_secret") is CheckOutcome.valid  # overlap
    assert {k.name for k in oauth.list_keys()} == {"seed", "keyrotor-run7"}
    oauth.revoke(key_id=seed.id, secret=None, credential_type="client_secret")
    assert oauth.check(Secret(seed.value), credential_type="client_secret") is CheckOutcome.invalid
    post = provider(server, client_secret_auth="client_secret_post")
    assert post.check(issued.secret, credential_type="client_secret") is CheckOutcome.valid


def test_a_third_secret_is_refused_permanently(server: AuthServerHandle) -> None:
    from worker.errors import PermanentError

    oauth = provider(server)
    server.add_secret(CLIENT, name="a")
    server.add_secret(CLIENT, name="b")
    with pytest.raises(PermanentError) as refused:
        oauth.issue(name="keyrotor-run8", credential_type="client_secret", labels={})
    assert "409" in str(refused.value)


def test_an_orphan_of_unknown_type_is_removed_from_the_list_that_holds_it(server: AuthServerHandle) -> None:
    oauth = provider(server)
    issued = oauth.issue(name="keyrotor-run9", credential_type="client_secret", labels={})
    assert oauth.revoke(key_id=issued.key_id, secret=None, credential_type="") is RevokeOutcome.revoked
    assert server.client(CLIENT).secrets == {}
