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
