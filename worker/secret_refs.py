"""References to secrets held elsewhere: ``{vault: "MOUNT/PATH#FIELD"}`` or ``{env: NAME}``.

The inventory never holds a secret value, only these references; they are resolved at the moment
of use and the value lives in memory only for that step.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Callable, Optional

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from worker.errors import ConfigError
from worker.secret import Secret

if TYPE_CHECKING:
    from worker.vault.store import VaultStore

_VAULT_REF = re.compile(r"^(?P<mount>[A-Za-z0-9_.-]+)/(?P<path>[A-Za-z0-9_./{}-]+)#(?P<field>[A-Za-z0-9_.-]+)$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SecretRef(BaseModel):
    """Where a secret can be read; exactly one of ``vault`` or ``env``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vault: Optional[str] = None
    env: Optional[str] = None

    @field_validator("vault")
    @classmethod
    def _vault(cls, value: str | None) -> str | None:
        if value is not None and not _VAULT_REF.match(value):
            raise ValueError("expected a Vault reference 'MOUNT/PATH#FIELD', e.g. 'secret/keyrotor/providers/alloy#admin_token'")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.match(value):
            raise ValueError("expected an environment variable name such as KEYROTOR_WEBHOOK_SECRET")
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> "SecretRef":
        if (self.vault is None) == (self.env is None):
            raise ValueError("a secret reference needs exactly one of 'vault' or 'env'")
        return self

    def vault_parts(self) -> tuple[str, str, str]:
        match = _VAULT_REF.match(self.vault or "")
        if not match:
            raise ConfigError(f"not a Vault reference: {self.vault!r}")
        return match["mount"], match["path"], match["field"]

    def describe(self) -> str:
        return f"vault:{self.vault}" if self.vault else f"env:{self.env}"


SecretResolver = Callable[[SecretRef], Secret]


def make_resolver(vault: "VaultStore | None", environ: dict[str, str] | None = None) -> SecretResolver:
    """A resolver that reads env references from ``environ`` and Vault references through ``vault``."""
    env = os.environ if environ is None else environ

    def resolve(ref: SecretRef) -> Secret:
        if ref.env is not None:
            value = env.get(ref.env)
            if not value:
                raise ConfigError(f"secret reference env:{ref.env}: the variable is not set or empty")
            return Secret(value)
        if vault is None:
            raise ConfigError(f"secret reference {ref.describe()} needs Vault, but no Vault is configured")
        mount, path, field = ref.vault_parts()
        return vault.read_field(mount, path, field)

    return resolve
