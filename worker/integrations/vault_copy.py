"""Vault copy integration: write the new secret to an application's own mount/path.

The target path is a template over ``{key_slug}`` / ``{key_name}``; re-delivery of the same
secret writes nothing (the copy already carries its fingerprint), so retries do not pile up
versions. ``verify`` reads the copy back and compares fingerprints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker.errors import ConfigError, PermanentError
from worker.integrations.base import Announcement, VerifyResult, VerifyStatus
from worker.inventory.schema import VaultCopyIntegrationSpec
from worker.text import key_slug
from worker.log import get_logger
from worker.providers.templating import render

if TYPE_CHECKING:
    from worker.vault.store import VaultStore

log = get_logger(__name__)


class VaultCopyIntegration:
    def __init__(self, name: str, spec: VaultCopyIntegrationSpec, *, vault: "VaultStore") -> None:
        self.name = name
        self.spec = spec
        self._vault = vault

    def target(self, announcement: Announcement) -> tuple[str, str, str]:
        """(mount, path, field) of the copy for this key."""
        try:
            path = render(self.spec.path, {"key_slug": key_slug(announcement.key_name), "key_name": announcement.key_name})
        except ConfigError as exc:
            raise PermanentError(f"integration {self.name!r}: {exc}") from None
        return self.spec.mount, path.strip("/"), self.spec.field or announcement.vault_field

    def push(self, announcement: Announcement) -> None:
        # Written without reading first: writing the same value again (a re-run) is harmless, and
        # ``verify`` reads the copy back anyway.
        mount, path, field = self.target(announcement)
        data = {field: announcement.secret.reveal(), "keyrotor_key_id": announcement.provider_key_id or ""}
        version = self._vault.write(mount, path, data)
        log.info("vault_copy_written", integration=self.name, mount=mount, path=path, version=version,
                 fingerprint=announcement.fingerprint)

    def verify(self, announcement: Announcement) -> VerifyResult:
        mount, path, field = self.target(announcement)
        current = self._vault.read_current(mount, path, field)
        if current is None:
            return VerifyResult(VerifyStatus.mismatch, None, f"{mount}/{path} does not exist")
        reported = current.secret.fingerprint
        if reported != announcement.fingerprint:
            return VerifyResult(VerifyStatus.mismatch, reported, f"{mount}/{path} holds another key")
        return VerifyResult(VerifyStatus.ok, reported)
