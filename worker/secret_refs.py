"""References to secrets held elsewhere: ``{vault: "MOUNT/PATH#FIELD"}`` or ``{env: NAME}``.

The inventory never holds a secret value, only these references; they are resolved at the moment
of use and the value lives in memory only for that step.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from typing import Any, Callable, Optional, Protocol

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from worker.errors import ConfigError, KeyrotorError, PermanentError, TransientError
from worker.secret import Secret

# A path may hold placeholders (``users/{labels[user]}``, filled in by the HTTP provider before
# reading) and an ``@`` (user names that are email addresses).
_VAULT_REF = re.compile(r"^(?P<mount>[A-Za-z0-9_.-]+)/(?P<path>[A-Za-z0-9_./{}\[\]@-]+)#(?P<field>[A-Za-z0-9_.-]+)$")
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


class FieldReader(Protocol):
    """What resolving a Vault reference needs of a store (``VaultStore``, any ``SecretStore``)."""

    def read_field(self, mount: str, path: str, field: str) -> Secret: ...


def make_resolver(vault: FieldReader | None, environ: dict[str, str] | None = None) -> SecretResolver:
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
        try:
            return vault.read_field(mount, path, field)
        except TransientError:
            raise  # Vault unreachable or sealed: worth retrying
        except PermanentError as exc:  # absent path or field, permission denied: a configuration fix
            raise ConfigError(f"secret reference {ref.describe()}: {exc}") from None

    return resolve


def iter_refs(data: Any, loc: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], SecretRef]]:
    """Every secret reference in plain data (a spec as stored, an inventory dump), with its location.

    A reference is a mapping whose only non-null entry is ``vault`` or ``env`` (a string)."""
    if isinstance(data, Mapping):
        present = {k: v for k, v in data.items() if v is not None}
        if present and set(present) <= {"vault", "env"} and len(present) == 1 and all(isinstance(v, str) for v in present.values()):
            try:
                yield loc, SecretRef.model_validate(present)
            except ValueError:
                pass  # malformed: the schema reports it
            return
        for name, value in data.items():
            yield from iter_refs(value, (*loc, name))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from iter_refs(value, (*loc, index))


def is_per_key(ref: SecretRef) -> bool:
    """Whether the reference's Vault path holds placeholders (``users/{labels[user]}``)."""
    return ref.vault is not None and "{" in ref.vault


def unresolvable(data: Any, resolve: SecretResolver) -> list[tuple[tuple[Any, ...], SecretRef, str]]:
    """``(location, reference, why)`` for each reference in ``data`` that does not resolve now.

    The values read are dropped at once; ``why`` never holds one (error texts carry no secret)."""
    problems: list[tuple[tuple[Any, ...], SecretRef, str]] = []
    for loc, ref in iter_refs(data):
        if is_per_key(ref):
            continue  # its path depends on the key (labels): checked per key (doctor, run preflight)
        try:
            resolve(ref)
        except Exception as exc:  # noqa: BLE001 - report every kind of failure, one line each
            why = str(exc) if isinstance(exc, KeyrotorError) else f"{ref.describe()}: {type(exc).__name__}"
            problems.append((loc, ref, why))
    return problems
