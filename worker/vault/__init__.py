"""keyrotor's Vault store (KV v2 on hvac) with token/Kubernetes auth and retries."""

from worker.vault.errors import (
    VaultCheckAndSetMismatch,
    VaultError,
    VaultNotFound,
    VaultPermissionDenied,
    VaultUnavailable,
)
from worker.vault.store import KEY_ID_FIELD, StoredSecret, VaultHealth, VaultStore, VersionInfo

__all__ = [
    "KEY_ID_FIELD",
    "StoredSecret",
    "VaultCheckAndSetMismatch",
    "VaultError",
    "VaultHealth",
    "VaultNotFound",
    "VaultPermissionDenied",
    "VaultStore",
    "VaultUnavailable",
    "VersionInfo",
]
