"""``SecretStore``: what the pipeline needs of a Vault store, as a typed seam.

``VaultStore`` (``worker/vault/store.py``) is the production one; tests pass fakes with the same
methods (``tests/fakes_pipeline.py``). Administrative calls the pipeline never makes (health,
metadata, listing versions, raw writes for the vault-copy integration) are not part of it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol, runtime_checkable

from worker.secret import Secret
from worker.vault.store import Deposit, StoredSecret


@runtime_checkable
class SecretStore(Protocol):
    #: The mount of run staging and owners' deposits (shown to owners as ``mount/path``).
    staging_mount: str

    # A key's served credential (KV v2 versions at the key's path).
    def read_current(self, mount: str, path: str, field: str) -> StoredSecret | None: ...
    def read_version(self, mount: str, path: str, field: str, version: int) -> StoredSecret: ...
    def promote(self, mount: str, path: str, field: str, secret: Secret, provider_key_id: str | None,
                expected_version: int | None) -> int: ...
    def restore(self, mount: str, path: str, from_version: int, expected_version: int) -> int: ...

    # A run's issued credential, staged until it is promoted or discarded.
    def stage_pending(self, run_id: str, secret: Secret, provider_key_id: str | None,
                      expires_at: datetime | None = None) -> None: ...
    def read_pending(self, run_id: str) -> tuple[Secret, str | None]: ...
    def pending_expiry(self, run_id: str) -> datetime | None: ...
    def discard_pending(self, run_id: str) -> None: ...

    # An owner's deposit (assisted mode).
    def deposit_path(self, key_name: str) -> str: ...
    def read_deposit(self, key_name: str) -> Deposit | None: ...
    def destroy_deposit(self, key_name: str) -> None: ...

    # Secret references (``{vault: "mount/path#field"}``) in provider and integration specs.
    def read_field(self, mount: str, path: str, field: str) -> Secret: ...
