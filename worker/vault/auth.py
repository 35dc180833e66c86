"""Vault authentication: a static token (VAULT_TOKEN) or Kubernetes service-account login, with
lazy token renewal.

Before each Vault call the store asks the auth to ``prepare`` the client: the token's lease is
tracked (from ``lookup-self`` or the login's ``lease_duration``); when less than a third of its
period is left it is renewed (``renew-self``), and with Kubernetes auth a failed renewal, a
non-renewable or an expired token leads to a fresh login. Near the token's max TTL Vault cuts a
renewal short (a shorter ``lease_duration`` and a warning) and, past it, answers 500 "past the max
TTL, cannot renew": a cut-short lease is marked ``capped`` and never renewed again — Kubernetes
auth logs in afresh instead, a static token is used until it expires. No polling loop: work happens only
when a call is about to be made (or, optionally, on a daemon thread's timed wait).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions as hvac_exc
import requests

from worker.clock import utcnow
from worker.log import get_logger
from worker.vault.errors import (
    Operation,
    VaultAuthConfigError,
    VaultError,
    VaultInvalidRequest,
    VaultPermissionDenied,
    VaultUnavailable,
    garbage_response,
    map_hvac_error,
    map_transport_error,
)

log = get_logger(__name__)

#: Renew when less than this fraction of the lease period remains.
RENEW_FRACTION = 1 / 3
#: After a failed lookup/renewal that left the token usable, wait this long before trying again.
RETRY_LATER = timedelta(seconds=15)


@dataclass(frozen=True)
class TokenLease:
    """What we know about the current token's lifetime. ``period_s == 0``: it never expires.
    ``capped``: Vault cut the last renewal short at the token's max TTL; renewing cannot extend it."""

    period_s: float
    obtained_at: datetime
    remaining_s: float
    renewable: bool
    capped: bool = False

    @property
    def expires_at(self) -> datetime | None:
        return None if self.period_s <= 0 else self.obtained_at + timedelta(seconds=self.remaining_s)

    def expired(self, now: datetime) -> bool:
        exp = self.expires_at
        return exp is not None and now >= exp - timedelta(seconds=1)

    def due_for_renewal(self, now: datetime) -> bool:
        exp = self.expires_at
        return exp is not None and (exp - now).total_seconds() < self.period_s * RENEW_FRACTION


def _auth_block(response: Any, op: Operation) -> dict[str, Any]:
    if not isinstance(response, dict) or not isinstance(response.get("auth"), dict):
        raise garbage_response(op, "no 'auth' block in the answer")
    return response["auth"]


class VaultAuth(ABC):
    """Keeps the hvac client holding a valid token. Thread-safe."""

    source: str = "unknown"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.lease: TokenLease | None = None
        self._quiet_until: datetime | None = None  # back-off after a failed renewal/lookup
        self.logins = 0
        self.renewals = 0

    def prepare(self, client: hvac.Client, addr: str = "") -> None:
        """Make sure ``client`` has a token worth using for the next call."""
        with self._lock:
            self._prepare(client, addr)

    def recover(self, client: hvac.Client, addr: str = "") -> bool:
        """After a 403: obtain a fresh token if this method can. True means "retry the call once"."""
        with self._lock:
            return self._recover(client, addr)

    @abstractmethod
    def _prepare(self, client: hvac.Client, addr: str) -> None: ...

    def _recover(self, client: hvac.Client, addr: str) -> bool:
        return False

    # -------------------------------------------------------------- shared helpers
    def _quiet(self, now: datetime) -> bool:
        return self._quiet_until is not None and now < self._quiet_until

    def _renew(self, client: hvac.Client, addr: str) -> None:
        op = Operation("renew the token (auth/token/renew-self)", capabilities=("update",))
        try:
            response = client.auth.token.renew_self()
        except hvac_exc.VaultError as exc:
            raise map_hvac_error(exc, op) from None
        except requests.RequestException as exc:
            raise map_transport_error(exc, op, addr) from None
        auth = _auth_block(response, op)
        granted = float(auth.get("lease_duration") or 0)
        previous = self.lease
        # The renewal window stays a third of the token's usual period; a renewal granting less
        # than that period was capped by the token's max TTL.
        period = previous.period_s if previous is not None and previous.period_s > 0 else granted
        capped = granted < period
        self.lease = TokenLease(period, utcnow(), granted, bool(auth.get("renewable")), capped=capped)
        self.renewals += 1
        if capped:
            log.warning("vault.token_near_max_ttl", vault_token_source=self.source, token_ttl=granted)
        else:
            log.info("vault.token_renewed", vault_token_source=self.source, token_ttl=granted)


class TokenAuth(VaultAuth):
    """A token given by the operator (VAULT_TOKEN). It can be renewed but not re-obtained."""

    source = "token"

    def __init__(self, token: str) -> None:
        super().__init__()
        if not token:
            raise VaultAuthConfigError("VAULT_TOKEN is empty: set it, or configure KEYROTOR_VAULT_K8S_ROLE")
        self._token = token

    def _prepare(self, client: hvac.Client, addr: str) -> None:
        if client.token != self._token:
            client.token = self._token
        now = utcnow()
        if self._quiet(now):
            return
        if self.lease is None:
            self._lookup(client, addr, now)
            if self.lease is None:
                return
        lease = self.lease
        if lease.due_for_renewal(now) and lease.renewable and not lease.capped:
            try:
                self._renew(client, addr)
            except VaultError as exc:
                self._quiet_until = now + RETRY_LATER
                if lease.expired(now):
                    raise VaultPermissionDenied(
                        f"VAULT_TOKEN has expired and could not be renewed ({exc}): issue a new token or use "
                        "Kubernetes auth (KEYROTOR_VAULT_K8S_ROLE)") from None
                log.warning("vault.token_renewal_failed", vault_token_source=self.source, error=str(exc))
        elif lease.expired(now):
            why = "has reached its max TTL" if lease.capped else "has expired and is not renewable"
            raise VaultPermissionDenied(
                f"VAULT_TOKEN {why}: issue a new token or use Kubernetes auth (KEYROTOR_VAULT_K8S_ROLE)")

    def _lookup(self, client: hvac.Client, addr: str, now: datetime) -> None:
        op = Operation("look up the token (auth/token/lookup-self)", capabilities=("read",))
        try:
            response = client.auth.token.lookup_self()
            data = response["data"] if isinstance(response, dict) else None
            if not isinstance(data, dict):
                raise garbage_response(op, "no 'data' in the lookup-self answer")
        except (hvac_exc.VaultError, requests.RequestException, VaultError) as exc:
            # Not fatal: the real call will say precisely what is wrong. Try again later.
            self._quiet_until = now + RETRY_LATER
            reason = exc if isinstance(exc, VaultError) else type(exc).__name__
            log.warning("vault.token_lookup_failed", vault_token_source=self.source, error=str(reason))
            return
        ttl = float(data.get("ttl") or 0)
        period = float(data.get("creation_ttl") or ttl)
        self.lease = TokenLease(period if ttl > 0 else 0.0, now, ttl, bool(data.get("renewable")))
        log.info("vault.token_looked_up", vault_token_source=self.source, token_ttl=ttl,
                 renewable=self.lease.renewable)


class KubernetesAuth(VaultAuth):
    """Logs in with the pod's service-account JWT; renews, and logs in again when renewal fails."""

    source = "kubernetes"

    def __init__(self, role: str, *, mount: str = "kubernetes", jwt_path: Path | str) -> None:
        super().__init__()
        if not role:
            raise VaultAuthConfigError("KEYROTOR_VAULT_K8S_ROLE is empty: name the Vault Kubernetes auth role")
        self.role = role
        self.mount = mount
        self.jwt_path = Path(jwt_path)

    def _read_jwt(self) -> str:
        # Read on every login: projected service-account tokens are rotated by the kubelet.
        try:
            jwt = self.jwt_path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise VaultAuthConfigError(
                f"cannot read the service-account token at {self.jwt_path} ({exc.strerror or type(exc).__name__}): "
                "mount it (automountServiceAccountToken / a projected volume) or set "
                "KEYROTOR_VAULT_K8S_JWT_PATH") from None
        if not jwt:
            raise VaultAuthConfigError(f"the service-account token file {self.jwt_path} is empty")
        return jwt

    def login(self, client: hvac.Client, addr: str = "") -> None:
        op = Operation(f"log in as Kubernetes role {self.role!r}", "auth", self.mount, "login")
        jwt = self._read_jwt()
        client.token = None  # an expired token must not be sent along with the login
        try:
            response = client.auth.kubernetes.login(role=self.role, jwt=jwt, use_token=True, mount_point=self.mount)
        except hvac_exc.VaultError as exc:
            err = map_hvac_error(exc, op)
            if isinstance(err, (VaultPermissionDenied, VaultInvalidRequest)):
                raise VaultPermissionDenied(
                    f"Kubernetes login as role {self.role!r} at auth/{self.mount} was refused: {_vault_said(exc)}; check "
                    "that the role binds this service account and namespace (bound_service_account_names/"
                    "namespaces) and that the auth method's config trusts the cluster's signing key",
                    status=err.status) from None
            raise err from None
        except requests.RequestException as exc:
            raise map_transport_error(exc, op, addr) from None
        except (KeyError, TypeError):
            raise garbage_response(op, "no client_token in the login answer") from None
        auth = _auth_block(response, op)
        period = float(auth.get("lease_duration") or 0)
        self.lease = TokenLease(period, utcnow(), period, bool(auth.get("renewable")))
        self._quiet_until = None
        self.logins += 1
        log.info("vault.logged_in", vault_token_source=self.source, role=self.role, token_ttl=period,
                 renewable=self.lease.renewable)

    def _prepare(self, client: hvac.Client, addr: str) -> None:
        now = utcnow()
        lease = self.lease
        if lease is None or not client.token or lease.expired(now):
            self.login(client, addr)
            return
        if not lease.due_for_renewal(now) or self._quiet(now):
            return
        if lease.renewable and not lease.capped:  # a capped token cannot be extended: log in afresh
            try:
                self._renew(client, addr)
                return
            except VaultError as exc:
                log.warning("vault.token_renewal_failed", vault_token_source=self.source, error=str(exc))
        try:
            self.login(client, addr)
        except VaultUnavailable:
            # The current token still works for a while; do not fail the call, try again later.
            self._quiet_until = now + RETRY_LATER
            log.warning("vault.relogin_deferred", vault_token_source=self.source)

    def _recover(self, client: hvac.Client, addr: str) -> bool:
        # A 403 is either a genuine policy denial (the token is fine: do not log in again for
        # nothing) or a token Vault no longer honours (revoked/expired early): then log in again.
        try:
            client.auth.token.lookup_self()
            return False
        except (hvac_exc.Forbidden, hvac_exc.Unauthorized):
            pass
        except (hvac_exc.VaultError, requests.RequestException):
            return False
        self.login(client, addr)
        return True


def _vault_said(exc: hvac_exc.VaultError) -> str:
    errors = exc.errors or []
    text = "; ".join(" ".join(str(e).split()) for e in errors) if isinstance(errors, list) else str(errors)
    return text[:300] or "no detail"


class BackgroundRenewer:
    """Optional daemon thread that calls ``auth.prepare`` periodically, so an idle worker's token
    does not expire between rare calls. It sleeps on an Event (no busy loop) and stops on ``stop()``."""

    def __init__(self, auth: VaultAuth, client: hvac.Client, addr: str = "", *, max_interval_s: float = 60.0,
                 min_interval_s: float = 1.0) -> None:
        self._auth, self._client, self._addr = auth, client, addr
        self._max_interval_s = max_interval_s
        self._min_interval_s = min_interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vault-token-renewer", daemon=True)

    def start(self) -> "BackgroundRenewer":
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _interval(self) -> float:
        lease = self._auth.lease
        if lease is None or lease.period_s <= 0:
            return self._max_interval_s
        return max(self._min_interval_s, min(self._max_interval_s, lease.period_s / 6))

    def _run(self) -> None:
        while not self._stop.wait(self._interval()):
            try:
                self._auth.prepare(self._client, self._addr)
            except VaultError as exc:  # the next call will surface it; keep the thread alive
                log.warning("vault.background_renewal_failed", error=str(exc))
