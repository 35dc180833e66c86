"""Vault errors, mapped from hvac/requests exceptions to keyrotor's transient/permanent vocabulary.

Steps branch on the class. Messages name the mount/path, the operation and what to do; they
never contain a secret (Vault does not echo request bodies; we add only paths, statuses and
Vault's own error strings) and the original exception is not chained, because an hvac exception
carries the raw response body.
"""

from __future__ import annotations

from dataclasses import dataclass

import hvac.exceptions as hvac_exc
import requests

from worker.errors import KeyrotorError, PermanentError, TransientError

POLICY_HINT = "see config/vault-policy.hcl"
_MAX_DETAIL = 300


class VaultError(KeyrotorError):
    """Base of every Vault failure. ``status`` is the HTTP status when there was one."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class VaultPermissionDenied(VaultError, PermanentError):
    """403: the token's policy does not allow the operation (or the token is invalid)."""


class VaultNotFound(VaultError, PermanentError):
    """The path, version or field does not exist (or the version is deleted/destroyed)."""


class VaultCheckAndSetMismatch(VaultError, PermanentError):
    """A check-and-set write found another current version: someone else wrote in between."""


class VaultInvalidRequest(VaultError, PermanentError):
    """Vault refused the request as malformed (400 other than check-and-set) or other 4xx."""


class VaultTLSError(VaultError, PermanentError):
    """TLS verification failed: a configuration problem, retrying will not help."""


class VaultAuthConfigError(VaultError, PermanentError):
    """The configured auth method cannot work (missing service-account token, no credentials)."""


class VaultUnavailable(VaultError, TransientError):
    """5xx, sealed, standby, rate-limited (429), timeouts and connection errors: retry later."""

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        VaultError.__init__(self, message, status=status)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Operation:
    """What was being attempted, for error messages: e.g. ``Operation("write", "secret", "data", "apps/x")``."""

    verb: str  # read | write | read metadata | write metadata | delete | list | login | renew | lookup
    mount: str = ""
    segment: str = ""  # data | metadata | "" for non-KV routes
    path: str = ""
    capabilities: tuple[str, ...] = ()  # what the policy needs, for the permission-denied hint

    @property
    def where(self) -> str:
        return "/".join(p for p in (self.mount, self.segment, self.path) if p)


def _detail(errors: object) -> str:
    """Vault's error strings, flattened and bounded (they never contain request bodies)."""
    if isinstance(errors, (list, tuple)):
        text = "; ".join(" ".join(str(e).split()) for e in errors if e)
    elif errors:
        text = " ".join(str(errors).split())
    else:
        text = ""
    return text[:_MAX_DETAIL]


def _status_of(exc: hvac_exc.VaultError) -> int | None:
    status = getattr(exc, "keyrotor_status", None)
    if status is not None:
        return int(status)
    for cls, code in (
        (hvac_exc.InvalidRequest, 400), (hvac_exc.Unauthorized, 401), (hvac_exc.Forbidden, 403),
        (hvac_exc.InvalidPath, 404), (hvac_exc.RateLimitExceeded, 429), (hvac_exc.InternalServerError, 500),
        (hvac_exc.VaultNotInitialized, 501), (hvac_exc.BadGateway, 502), (hvac_exc.VaultDown, 503),
    ):
        if isinstance(exc, cls):
            return code
    return None


def map_hvac_error(exc: hvac_exc.VaultError, op: Operation) -> VaultError:
    """Translate an hvac exception raised during ``op`` into a keyrotor Vault error."""
    status = _status_of(exc)
    detail = _detail(exc.errors if exc.errors is not None else (exc.args[0] if exc.args else ""))
    retry_after = getattr(exc, "keyrotor_retry_after", None)
    where = op.where or "Vault"
    said = f" (Vault said: {detail})" if detail else ""

    if status == 403 or status == 401:
        caps = " and ".join(f"'{c}'" for c in op.capabilities) or "the right capabilities"
        return VaultPermissionDenied(
            f"permission denied to {op.verb} {where}: the token's policy needs {caps} there, or the token "
            f"is invalid/expired — {POLICY_HINT}{said}", status=status)
    if status == 404:
        return VaultNotFound(f"{where} not found ({op.verb}){said}: check the mount and path exist", status=404)
    if status == 400 and "check-and-set parameter did not match" in detail:
        return VaultCheckAndSetMismatch(
            f"check-and-set failed writing {where}: its current version is not the one expected — another "
            "writer changed it; re-read the current version before deciding", status=400)
    if status == 400 and "check-and-set parameter required" in detail:
        return VaultInvalidRequest(
            f"{where} requires check-and-set (cas_required) but the write had none: pass cas", status=400)
    if status == 412:  # performance standby not yet caught up with a write (X-Vault-Index)
        return VaultUnavailable(f"Vault is not yet consistent for {where} ({op.verb}){said}; retry", status=412,
                                retry_after=retry_after)
    if status == 429:
        return VaultUnavailable(f"Vault rate-limited {op.verb} on {where}{said}; retry later", status=429,
                                retry_after=retry_after)
    if status == 503 and "sealed" in detail.lower():
        return VaultUnavailable(f"Vault is sealed ({op.verb} {where}): unseal it", status=503, retry_after=retry_after)
    if "past the max TTL" in detail:  # Vault answers 500 to renewing a token beyond its max TTL: not transient
        return VaultInvalidRequest(f"cannot {op.verb}: the token is past its max TTL and Vault renews it no "
                                   f"further; log in again or issue a new token{said}", status=status)
    if status == 501:
        return VaultUnavailable(f"Vault is not initialised ({op.verb} {where}): initialise and unseal it", status=501)
    if status is not None and status >= 500:
        return VaultUnavailable(f"Vault answered {status} to {op.verb} {where}{said}; retry later", status=status,
                                retry_after=retry_after)
    return VaultInvalidRequest(f"Vault refused to {op.verb} {where} (HTTP {status}){said}", status=status)


def map_transport_error(exc: requests.RequestException, op: Operation, addr: str) -> VaultError:
    """Connection problems: TLS is a configuration error, the rest is transient."""
    where = op.where or "Vault"
    if isinstance(exc, requests.exceptions.SSLError):
        return VaultTLSError(
            f"TLS verification failed talking to Vault at {addr} ({op.verb} {where}): set VAULT_CACERT to the CA "
            "bundle that signed Vault's certificate")
    if isinstance(exc, requests.exceptions.Timeout):
        return VaultUnavailable(f"Vault at {addr} timed out ({op.verb} {where}); retry later or raise "
                                "KEYROTOR_VAULT_TIMEOUT_S")
    if isinstance(exc, requests.exceptions.ConnectionError):
        return VaultUnavailable(f"cannot connect to Vault at {addr} ({op.verb} {where}): check VAULT_ADDR and "
                                "that Vault is running")
    return VaultUnavailable(f"request to Vault at {addr} failed ({op.verb} {where}): {type(exc).__name__}")


def garbage_response(op: Operation, what: str) -> VaultUnavailable:
    """Vault (or a proxy in front of it) answered something we cannot parse; usually transient."""
    return VaultUnavailable(f"unexpected answer from Vault to {op.verb} {op.where or ''}: {what}")
