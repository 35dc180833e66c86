"""The Vault seam: ``VaultStore`` and the pipeline's fakes all are ``SecretStore``s, with the same
method signatures (a fake that drifts from the store fails here, not in a confusing step test)."""

from __future__ import annotations

import inspect

import hvac
import pytest

from tests.fakes_pipeline import FakeVault
from tests.unit.test_protocol_stateful import ModelVault
from worker.errors import PermanentError
from worker.secret_refs import SecretRef, make_resolver
from worker.vault.auth import TokenAuth
from worker.vault.errors import VaultNotFound
from worker.vault.secret_store import SecretStore
from worker.vault.store import VaultStore

_MEMBERS = [name for name, value in vars(SecretStore).items() if inspect.isfunction(value) and not name.startswith("_")]


def _store() -> VaultStore:
    addr = "http://127.0.0.1:1"  # never contacted: construction makes no call
    return VaultStore(hvac.Client(url=addr, timeout=1), TokenAuth("t"), addr=addr)


def test_the_protocol_names_what_the_pipeline_uses() -> None:
    assert set(_MEMBERS) == {
        "read_current", "read_version", "promote", "restore", "stage_pending", "read_pending", "pending_expiry",
        "discard_pending", "deposit_path", "read_deposit", "destroy_deposit", "read_field",
    }


@pytest.mark.parametrize("store_class", [VaultStore, FakeVault, ModelVault])
def test_stores_have_the_protocols_signatures(store_class: type) -> None:
    for name in _MEMBERS:
        wanted = list(inspect.signature(getattr(SecretStore, name)).parameters)
        actual = list(inspect.signature(getattr(store_class, name)).parameters)
        assert actual == wanted, f"{store_class.__name__}.{name}{actual} differs from SecretStore.{name}{wanted}"


def test_vault_store_and_fake_are_secret_stores() -> None:
    assert isinstance(_store(), SecretStore)
    assert isinstance(FakeVault(), SecretStore)
    assert not isinstance(object(), SecretStore)


def test_fake_read_field_behaves_like_the_store() -> None:
    vault = FakeVault()
    vault.seed("secret", "providers/acme", "admin", "s3cret-admin", None)
    resolve = make_resolver(vault, environ={})
    assert resolve(SecretRef(vault="secret/providers/acme#admin")).reveal() == "s3cret-admin"
    with pytest.raises(VaultNotFound):
        vault.read_field("secret", "providers/other", "admin")
    # like VaultStore: an absent path is a configuration problem for the resolver, not a crash
    assert issubclass(VaultNotFound, PermanentError)
