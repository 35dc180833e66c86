"""Mapping of hvac/requests failures to keyrotor's Vault errors, and no secret in what is raised."""

from __future__ import annotations

import traceback
from types import SimpleNamespace
from typing import Any

import hvac.exceptions as hvac_exc
import pytest
import requests

from worker.errors import KeyrotorError, PermanentError, TransientError
from worker.secret import Secret
from worker.vault.auth import TokenAuth
from worker.vault.errors import (
    Operation,
    VaultCheckAndSetMismatch,
    VaultError,
    VaultInvalidRequest,
    VaultNotFound,
    VaultPermissionDenied,
    VaultTLSError,
    VaultUnavailable,
    map_hvac_error,
    map_transport_error,
)
from worker.vault.store import VaultStore

WRITE = Operation("write", "secret", "data", "apps/x", ("create", "update"))
SECRET = "sk_live_THIS_IS_A_SECRET_VALUE_123456"


def hvac_error(cls: type[hvac_exc.VaultError], errors: list[str] | None = None, status: int | None = None,
               retry_after: float | None = None, **kwargs: Any) -> hvac_exc.VaultError:
    exc = cls(errors=errors, method="post", url="http://vault/v1/secret/data/apps/x", **kwargs)
    if status is not None:
        exc.keyrotor_status = status  # type: ignore[attr-defined]
    exc.keyrotor_retry_after = retry_after  # type: ignore[attr-defined]
    return exc


def test_error_hierarchy() -> None:
    for cls in (VaultPermissionDenied, VaultNotFound, VaultCheckAndSetMismatch, VaultInvalidRequest, VaultTLSError):
        assert issubclass(cls, VaultError) and issubclass(cls, PermanentError) and not issubclass(cls, TransientError)
    assert issubclass(VaultUnavailable, TransientError) and issubclass(VaultUnavailable, VaultError)
    assert issubclass(VaultError, KeyrotorError)


def test_forbidden_names_path_capabilities_and_policy() -> None:
    err = map_hvac_error(hvac_error(hvac_exc.Forbidden, ["1 error occurred:\n\t* permission denied\n\n"]), WRITE)
    assert isinstance(err, VaultPermissionDenied) and err.status == 403
    text = str(err)
    assert "secret/data/apps/x" in text and "'create' and 'update'" in text and "config/vault-policy.hcl" in text
    assert "permission denied" in text and "\n" not in text  # Vault's multi-line message is flattened


def test_cas_mismatch_and_cas_required() -> None:
    err = map_hvac_error(hvac_error(hvac_exc.InvalidRequest, ["check-and-set parameter did not match the current version"]), WRITE)
    assert isinstance(err, VaultCheckAndSetMismatch) and "secret/data/apps/x" in str(err)
    err = map_hvac_error(hvac_error(hvac_exc.InvalidRequest, ["check-and-set parameter required for this call"]), WRITE)
    assert type(err) is VaultInvalidRequest and "cas" in str(err)


def test_other_400_is_permanent_invalid_request() -> None:
    err = map_hvac_error(hvac_error(hvac_exc.InvalidRequest, ["no data provided"]), WRITE)
    assert type(err) is VaultInvalidRequest and "no data provided" in str(err)


def test_not_found() -> None:
    err = map_hvac_error(hvac_error(hvac_exc.InvalidPath, []), WRITE)
    assert isinstance(err, VaultNotFound) and err.status == 404


@pytest.mark.parametrize(
    ("cls", "status", "errors", "needle"),
    [
        (hvac_exc.InternalServerError, None, ["internal error"], "500"),
        (hvac_exc.BadGateway, None, [], "502"),
        (hvac_exc.VaultDown, None, ["Vault is sealed"], "sealed"),
        (hvac_exc.VaultNotInitialized, None, [], "not initialised"),
        (hvac_exc.RateLimitExceeded, None, ["request path kv/foo: rate limit quota exceeded"], "rate-limited"),
        (hvac_exc.UnexpectedError, 504, [], "504"),
        (hvac_exc.UnexpectedError, 412, ["required index state not present"], "consistent"),
    ],
)
def test_server_side_failures_are_transient(cls: type[hvac_exc.VaultError], status: int | None,
                                            errors: list[str], needle: str) -> None:
    err = map_hvac_error(hvac_error(cls, errors, status=status, retry_after=2.0), WRITE)
    assert isinstance(err, VaultUnavailable), err
    assert needle in str(err)


def test_retry_after_travels_on_rate_limit() -> None:
    err = map_hvac_error(hvac_error(hvac_exc.RateLimitExceeded, [], status=429, retry_after=7.0), WRITE)
    assert isinstance(err, VaultUnavailable) and err.retry_after == 7.0


def test_unexpected_4xx_is_permanent() -> None:
    err = map_hvac_error(hvac_error(hvac_exc.UnexpectedError, ["unsupported operation"], status=405), WRITE)
    assert type(err) is VaultInvalidRequest and "405" in str(err)


def test_transport_errors() -> None:
    addr = "https://vault.example:8200"
    assert isinstance(map_transport_error(requests.exceptions.SSLError("cert"), WRITE, addr), VaultTLSError)
    assert "VAULT_CACERT" in str(map_transport_error(requests.exceptions.SSLError("cert"), WRITE, addr))
    timeout = map_transport_error(requests.exceptions.ReadTimeout("slow"), WRITE, addr)
    assert isinstance(timeout, VaultUnavailable) and "timed out" in str(timeout)
    conn = map_transport_error(requests.exceptions.ConnectionError("refused"), WRITE, addr)
    assert isinstance(conn, VaultUnavailable) and addr in str(conn) and "VAULT_ADDR" in str(conn)


# ---------------------------------------------------------------- through the store (fake hvac)
class FakeKV:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
        self.calls = 0

    def create_or_update_secret(self, **kwargs: Any) -> Any:
        self.calls += 1
        raise self.exc

    def read_secret_version(self, **kwargs: Any) -> Any:
        self.calls += 1
        raise self.exc


def fake_store(exc: BaseException) -> tuple[VaultStore, FakeKV]:
    kv = FakeKV(exc)
    lookup = {"data": {"ttl": 0, "creation_ttl": 0, "renewable": False}}
    client = SimpleNamespace(token=None, secrets=SimpleNamespace(kv=SimpleNamespace(v2=kv)),
                             auth=SimpleNamespace(token=SimpleNamespace(lookup_self=lambda: lookup)))
    return VaultStore(client, TokenAuth("t"), addr="http://vault", sleep=lambda s: None), kv  # type: ignore[arg-type]


def test_store_raises_no_secret_and_does_not_chain_the_hvac_error() -> None:
    # An hvac error carries the raw response text/json; ours must not drag it along.
    body = {"errors": ["no"], "echo": SECRET}
    store, kv = fake_store(hvac_error(hvac_exc.InvalidRequest, ["invalid request"], text=str(body), json=body))
    with pytest.raises(VaultInvalidRequest) as info:
        store.promote("secret", "apps/x", "api_key", Secret(SECRET), "key_1", None)
    rendered = "".join(traceback.format_exception(info.value))
    assert SECRET not in rendered and SECRET not in repr(vars(info.value))
    assert info.value.__cause__ is None and info.value.__suppress_context__ is False
    assert info.value.__context__ is None
    assert kv.calls == 1  # 4xx: no retry


def test_store_retries_transient_then_gives_up() -> None:
    store, kv = fake_store(hvac_error(hvac_exc.VaultDown, ["Vault is sealed"]))
    with pytest.raises(VaultUnavailable, match="sealed"):
        store.read_current("secret", "apps/x", "api_key")
    assert kv.calls == 4  # default retry_attempts


def test_store_maps_connection_errors() -> None:
    store, kv = fake_store(requests.exceptions.ConnectionError("refused"))
    with pytest.raises(VaultUnavailable, match="cannot connect"):
        store.write("secret", "apps/x", {"a": "b"})
    assert kv.calls == 4


def test_store_rejects_bad_paths_before_calling_vault() -> None:
    store, kv = fake_store(RuntimeError("must not be called"))
    for bad in ("", "/", "apps/../etc", "a//b"):
        with pytest.raises(VaultInvalidRequest):
            store.write("secret", bad, {"a": "b"})
    with pytest.raises(VaultInvalidRequest):
        store.stage_pending("../x", Secret(SECRET), None)
    assert kv.calls == 0


def test_renewal_past_max_ttl_is_permanent_not_a_retryable_500() -> None:
    """OpenBao/Vault answer 500 with this text to renew-self on a token past its max TTL."""
    exc = hvac_error(hvac_exc.InternalServerError, ["1 error occurred:\n\t* past the max TTL, cannot renew\n\n"],
                     status=500)
    err = map_hvac_error(exc, Operation("renew the token (auth/token/renew-self)", capabilities=("update",)))
    assert isinstance(err, VaultInvalidRequest) and isinstance(err, PermanentError)
    assert "past its max TTL" in str(err) and err.status == 500
