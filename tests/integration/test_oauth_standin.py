"""The authorization server stand-in behaves as RFC 6749 / RFC 7523 / RFC 6750 require, driven over
real HTTP with httpx and assertions built with PyJWT (not with keyrotor's own code)."""

from __future__ import annotations

import time
import uuid
from typing import Any, Iterator

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from keyrotor_sandbox.oauth_server import JWT_BEARER, AuthServerHandle, start_auth_server_in_thread

pytestmark = pytest.mark.integration
CLIENT = "reporting-client"


class Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def server(clock: Clock) -> Iterator[AuthServerHandle]:
    handle = start_auth_server_in_thread(resource_scopes={"/api/reports": "read:reports", "/api/admin": "admin:all"},
                                         token_ttl_s=60, clock=clock)
    handle.add_client(CLIENT, {"read:reports", "write:reports"})
    yield handle
    handle.stop()


def new_key(kid: str = "k1") -> tuple[Any, dict[str, Any]]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = {**RSAAlgorithm.to_jwk(private.public_key(), as_dict=True), "kid": kid, "alg": "RS256", "use": "sig"}
    return private, jwk


def assertion(private: Any, server: AuthServerHandle, *, kid: str = "k1", **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": CLIENT, "sub": CLIENT, "aud": server.token_url, "iat": now, "exp": now + 60, "jti": uuid.uuid4().hex}
    body.update(claims)
    return jwt.encode({k: v for k, v in body.items() if v is not None}, private, algorithm="RS256", headers={"kid": kid})


def token_request(server: AuthServerHandle, client_assertion: str, scope: str = "read:reports", **extra: str) -> httpx.Response:
    form = {"grant_type": "client_credentials", "scope": scope, "client_assertion_type": JWT_BEARER,
            "client_assertion": client_assertion, **extra}
    return httpx.post(server.token_url, data=form, timeout=10)


@pytest.fixture
def registered(server: AuthServerHandle) -> Any:
    private, jwk = new_key()
    server.register_jwk(CLIENT, jwk, name="seed")
    return private


def test_a_valid_assertion_gets_a_short_lived_token_for_the_allowed_scopes(server: AuthServerHandle, registered: Any) -> None:
    answer = token_request(server, assertion(registered, server), scope="read:reports not:allowed")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 60
    assert body["scope"] == "read:reports"  # RFC 6749 3.3: the granted scope, when it differs
    assert answer.headers["Cache-Control"] == "no-store"
    api = httpx.get(f"{server.url}/api/reports", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert api.status_code == 200 and api.json()["client_id"] == CLIENT


@pytest.mark.parametrize(("why", "make"), [
    ("bad signature", lambda s, p: assertion(new_key()[0], s)),
    ("wrong aud", lambda s, p: assertion(p, s, aud="https://elsewhere.example/oauth/token")),
    ("expired", lambda s, p: assertion(p, s, iat=int(time.time()) - 300, exp=int(time.time()) - 1)),
    ("unknown kid", lambda s, p: assertion(p, s, kid="nope")),
    ("iss differs from sub", lambda s, p: assertion(p, s, iss="someone-else")),
    ("no jti", lambda s, p: assertion(p, s, jti=None)),
    ("no exp", lambda s, p: assertion(p, s, exp=None)),
    ("unknown client", lambda s, p: assertion(p, s, iss="ghost", sub="ghost")),
    ("not a JWT", lambda s, p: "not-a-jwt"),
])
def test_assertions_rfc_7523_refuses_are_invalid_client(server: AuthServerHandle, registered: Any, why: str, make: Any) -> None:
    answer = token_request(server, make(server, registered))
    assert answer.status_code == 401, (why, answer.text)
    assert answer.json()["error"] == "invalid_client"
    assert "access_token" not in answer.json()


def test_a_replayed_jti_is_refused(server: AuthServerHandle, registered: Any) -> None:
    once = assertion(registered, server)
    assert token_request(server, once).status_code == 200
    again = token_request(server, once)
    assert again.status_code == 401 and again.json()["error"] == "invalid_client"
    assert server.state.refusals[-1] == "replayed jti"


def test_an_expired_jwk_no_longer_authenticates(server: AuthServerHandle, clock: Clock) -> None:
    private, jwk = new_key("short")
    server.register_jwk(CLIENT, jwk, expires_at=time.time() + 30)
    assert token_request(server, assertion(private, server, kid="short")).status_code == 200
    clock.offset = 31
    answer = token_request(server, assertion(private, server, kid="short", iat=int(clock()), exp=int(clock()) + 60))
    assert answer.status_code == 401 and server.state.refusals[-1] == "the JWK has expired"


def test_a_token_without_the_scope_gets_403_naming_it_and_an_expired_token_401(server: AuthServerHandle, registered: Any,
                                                                               clock: Clock) -> None:
    token = token_request(server, assertion(registered, server), scope="write:reports").json()["access_token"]
    denied = httpx.get(f"{server.url}/api/reports", headers={"Authorization": f"Bearer {token}"})
    assert denied.status_code == 403
    assert denied.headers["WWW-Authenticate"] == 'Bearer error="insufficient_scope", scope="read:reports"'
    clock.offset = 61
    assert httpx.get(f"{server.url}/api/reports", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    assert httpx.get(f"{server.url}/api/reports").status_code == 401


def test_only_disallowed_scopes_is_invalid_scope_and_other_grants_unsupported(server: AuthServerHandle, registered: Any) -> None:
    answer = token_request(server, assertion(registered, server), scope="admin:all")
    assert answer.status_code == 400 and answer.json()["error"] == "invalid_scope"
    grant = httpx.post(server.token_url, data={"grant_type": "password", "username": "u", "password": "p"})
    assert grant.status_code == 400 and grant.json()["error"] == "unsupported_grant_type"


def admin(server: AuthServerHandle, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{server.url}/admin/clients/{CLIENT}{path}",
                         headers={"Authorization": f"Bearer {server.admin_token}"}, timeout=10, **kwargs)


def test_the_admin_api_manages_the_client_s_jwks(server: AuthServerHandle) -> None:
    private, jwk = new_key("k2")
    assert httpx.get(f"{server.url}/admin/clients/{CLIENT}/jwks").status_code == 401
    assert admin(server, "POST", "/jwks", json={"jwk": {**jwk, "d": "private-part"}}).status_code == 400
    created = admin(server, "POST", "/jwks", json={"jwk": jwk, "name": "keyrotor-run1"})
    assert created.status_code == 201 and created.json()["kid"] == "k2"
    assert admin(server, "POST", "/jwks", json={"jwk": jwk}).status_code == 409
    listed = admin(server, "GET", "/jwks").json()["keys"]
    assert [(k["kid"], k["name"]) for k in listed] == [("k2", "keyrotor-run1")]
    assert token_request(server, assertion(private, server, kid="k2")).status_code == 200
    assert admin(server, "DELETE", "/jwks/k2").status_code == 204
    assert admin(server, "DELETE", "/jwks/k2").status_code == 404
    assert token_request(server, assertion(private, server, kid="k2")).status_code == 401


def test_client_secrets_two_active_at_most_basic_and_post(server: AuthServerHandle) -> None:
    first = admin(server, "POST", "/secrets", json={"name": "one"}).json()
    second = admin(server, "POST", "/secrets", json={"name": "two"}).json()
    third = admin(server, "POST", "/secrets", json={"name": "three"})
    assert third.status_code == 409 and "at most 2" in third.json()["error"]
    listed = admin(server, "GET", "/secrets").json()["secrets"]
    assert {s["id"] for s in listed} == {first["id"], second["id"]} and all("secret" not in s for s in listed)
    basic = httpx.post(server.token_url, data={"grant_type": "client_credentials", "scope": "read:reports"},
                       auth=(CLIENT, first["secret"]))
    post = httpx.post(server.token_url, data={"grant_type": "client_credentials", "client_id": CLIENT,
                                              "client_secret": second["secret"]})
    assert basic.status_code == 200 and post.status_code == 200
    wrong = httpx.post(server.token_url, data={"grant_type": "client_credentials"}, auth=(CLIENT, "cs_wrong"))
    assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_client"
    assert wrong.headers["WWW-Authenticate"].startswith("Basic")
    assert admin(server, "DELETE", f"/secrets/{first['id']}").status_code == 204
    assert httpx.post(server.token_url, data={"grant_type": "client_credentials"},
                      auth=(CLIENT, first["secret"])).status_code == 401


def test_past_its_rate_limit_the_server_answers_429_with_retry_after() -> None:
    server = start_auth_server_in_thread(rate_limit=(3, 2.0))
    try:
        statuses = [httpx.get(f"{server.url}/api/reports") for _ in range(4)]
        assert [r.status_code for r in statuses] == [401, 401, 401, 429]
        assert statuses[-1].headers["Retry-After"] in ("1", "2")
        assert [entry[2:] for entry in server.state.log][-1] == (429, float(statuses[-1].headers["Retry-After"]))
    finally:
        server.stop()
