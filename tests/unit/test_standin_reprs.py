"""The stand-ins' records print no secret in a repr (tracebacks, debuggers, log lines of objects)."""

from __future__ import annotations

from datetime import datetime, timezone

from worker.sandbox.consumer import ConsumerConfig
from worker.sandbox.provider import ProviderState, SandboxKey
from worker.sandbox.vault.app import Response
from worker.sandbox.vault.kv2 import Version
from worker.sandbox.vault.request import Request
from worker.sandbox.vault.tokens import Token

SECRET = "s3cr3t-value-that-must-not-print"
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def test_no_secret_in_standin_reprs() -> None:
    key = SandboxKey(id="k1", name="keyrotor-r1", secret=SECRET, owner="o", credential_type="api_key",
                     created_at=0.0, active_at=0.0, expires_at=None)
    state = ProviderState(admin_token=SECRET, keys={"k1": key})
    config = ConsumerConfig(vault_addr="http://v", vault_token=SECRET, mount="secret", path="p", field="f",
                            provider_url="http://p", signing_secret=SECRET)
    version = Version(created=NOW, data={"api_key": SECRET})
    request = Request(operation="UPDATE", path="secret/data/p", body={"data": {"api_key": SECRET}})
    response = Response(200, SECRET.encode(), {})
    token = Token(id=SECRET, accessor="acc1", policies=["default"], path="auth/token/create", display_name="t",
                  created=NOW, ttl=0, expires=None, renewable=False, orphan=False)
    for thing in (key, state, config, version, request, response, token):
        assert SECRET not in repr(thing), type(thing).__name__
    assert "keyrotor-r1" in repr(key) and "acc1" in repr(token)  # the rest still prints
