"""The stand-ins' records print no secret in a repr (tracebacks, debuggers, log lines of objects)."""

from __future__ import annotations

from keyrotor_sandbox.consumer import ConsumerConfig
from keyrotor_sandbox.provider import ProviderState, SandboxKey

SECRET = "s3cr3t-value-that-must-not-print"


def test_no_secret_in_standin_reprs() -> None:
    key = SandboxKey(id="k1", name="keyrotor-r1", secret=SECRET, owner="o", credential_type="api_key",
                     created_at=0.0, active_at=0.0, expires_at=None)
    state = ProviderState(admin_token=SECRET, keys={"k1": key})
    config = ConsumerConfig(vault_addr="http://v", vault_token=SECRET, mount="secret", path="p", field="f",
                            provider_url="http://p", signing_secret=SECRET)
    for thing in (key, state, config):
        assert SECRET not in repr(thing), type(thing).__name__
    assert "keyrotor-r1" in repr(key)  # the rest still prints


def test_no_secret_in_the_authorization_server_stand_in_s_reprs() -> None:
    from keyrotor_sandbox.oauth_server import AuthServerState, Client, ClientSecret

    secret = ClientSecret(id="cs_1", value=SECRET, name="keyrotor-r1")
    client = Client(client_id="c", allowed_scopes={"read"}, secrets={"cs_1": secret})
    state = AuthServerState(admin_token=SECRET, clients={"c": client}, tokens={SECRET: ("c", frozenset(), 0.0)})
    for thing in (secret, client, state):
        assert SECRET not in repr(thing), type(thing).__name__
    assert "keyrotor-r1" in repr(secret)


def test_no_secret_in_the_asana_standins_reprs() -> None:
    from keyrotor_sandbox.asana import AsanaState

    state = AsanaState(control_token=SECRET)
    pat = state.create_pat("alice", "ci")
    key = state.generate_api_key("bob", before_deprecation=True)
    for thing in (state, pat, key):
        text = repr(thing)
        assert SECRET not in text and pat.token not in text and key.token not in text, type(thing).__name__
    assert "'ci'" in repr(pat)
