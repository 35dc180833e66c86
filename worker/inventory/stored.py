"""Read a spec back from its database record (or take a bare spec): one helper for the provider and
integration registries, which both accept either form."""

from __future__ import annotations

from typing import Any, Callable, TypeVar, cast

from pydantic import ValidationError

from worker.errors import ConfigError

T = TypeVar("T")


def spec_of(record_or_spec: Any, name: str | None, *, spec_types: tuple[type, ...], validate: Callable[[dict[str, Any]], T],
            builder: str, kind: str, expected: str) -> tuple[str, T]:
    """(name, spec) from a bare spec plus ``name=``, or from a record with ``name`` and a ``spec`` dict.

    ``builder`` names the caller in errors, ``kind`` the thing ("provider"), ``expected`` what may be passed.
    """
    if isinstance(record_or_spec, spec_types):
        if not name:
            raise ConfigError(f"{builder}: pass name= with a bare {kind} spec")
        return name, cast(T, record_or_spec)  # one of spec_types: the caller's T
    data = getattr(record_or_spec, "spec", None)
    record_name = getattr(record_or_spec, "name", None) or name
    if not isinstance(data, dict) or not record_name:
        raise ConfigError(f"{builder}: expected {expected}, got {type(record_or_spec).__name__}")
    try:
        return record_name, validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{kind} {record_name!r}: stored spec is invalid ({exc.error_count()} errors; re-run `keyrotor config apply`)") from None
