"""Errors carried to the HTTP layer with Vault's status codes and message shapes."""

from __future__ import annotations

from typing import Any


class VaultHTTPError(Exception):
    """An error response: ``{"errors": [...]}`` with ``status``, or a full ``body`` (Vault answers
    a soft-deleted KV v2 read with 404 *and* the envelope)."""

    def __init__(self, status: int, errors: list[str] | None = None, body: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status}: {errors}")
        self.status = status
        self.errors = errors if errors is not None else []
        self.body = body


def multierror(*messages: str) -> str:
    """Go's hashicorp/go-multierror formatting, used by Vault for ACL failures."""
    count = len(messages)
    head = "1 error occurred:" if count == 1 else f"{count} errors occurred:"
    return head + "".join(f"\n\t* {m}" for m in messages) + "\n\n"


def bad_request(message: str) -> VaultHTTPError:
    return VaultHTTPError(400, [message])


def not_found(message: str | None = None) -> VaultHTTPError:
    return VaultHTTPError(404, [message] if message else [])


def permission_denied() -> VaultHTTPError:
    return VaultHTTPError(403, [multierror("permission denied")])


def invalid_token() -> VaultHTTPError:
    return VaultHTTPError(403, [multierror("permission denied", "invalid token")])


def unsupported_path() -> VaultHTTPError:
    return VaultHTTPError(404, [multierror("unsupported path")])


def unsupported_operation() -> VaultHTTPError:
    return VaultHTTPError(405, [multierror("unsupported operation")])
