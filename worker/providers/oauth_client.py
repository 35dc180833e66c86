"""An OAuth 2.0 client as a ``Provider``: rotates a private-key JWT key pair or a client secret.

- ``issue``: ``private_key_jwt`` generates a key pair, registers the public JWK (``kid`` = RFC 7638
  thumbprint) through the admin API and returns the private key PEM as the secret and the ``kid``
  as the key id; ``client_secret`` asks the admin API for a second active secret.
  A registration whose answer was lost (timeout, 5xx, connection reset) is settled in the call:
  the client's JWKs are listed and the ``kid`` looked for, so a key that landed is used, never
  registered twice. A secret whose answer was lost cannot be recovered (the server made it): the
  call fails and the issue step revokes whatever is listed under the run's name.
- ``check``: obtain a token for the configured scopes (client assertion signed with the key, or
  the secret) and make the scoped API call with it. ``invalid_client`` or a 401 → ``invalid``;
  a 403 raises ``MissingScope`` (permanent) naming the scope the API asked for.
- ``revoke``: remove the JWK by ``kid`` (or the secret by id) through the admin API; 404 → already gone.
- ``list_keys``: the client's JWKs and secrets (id, name, creation time), for the orphan scan.

Nothing secret is logged: request lines carry the method, the URL without its query, the status.
"""

from __future__ import annotations

import re
import time
from base64 import b64encode
from datetime import datetime, timezone
from typing import Any, Callable, Mapping
from urllib.parse import quote, urlsplit, urlunsplit

import httpx

from worker.clock import utcnow
from worker.errors import ConfigError, GarbageResponse, PermanentError, RateLimited, TransientError
from worker.http_security import check_tls_verify, note_insecure_http
from worker.inventory.oauth_schema import (
    CLIENT_SECRET,
    JWK_VALUE,
    PRIVATE_KEY_JWT,
    PUBLIC_KEY_PEM_VALUE,
    AdminCallSpec,
    OAuthClientProviderSpec,
)
from worker.inventory.provider_parts import BasicAuthSpec, BearerAuthSpec, HeaderAuthSpec
from worker.log import get_logger
from worker.protocol.states import Mode
from worker.providers.base import CheckOutcome, IssuedCredential, ProviderKeyInfo, RevokeOutcome
from worker.providers.answers import count_request, field_at, listed_live, optional_at, parse_time
from worker.providers.oauth_keys import JWT_BEARER_ASSERTION, KeyPair, client_assertion, generate_key_pair, key_pair_from_pem
from worker.providers.ratelimit import LEASE_MARGIN_S, RateLimit, RateLimiter
from worker.providers.templating import render, render_url
from worker.retry import parse_retry_after, retry_call
from worker.secret import Secret
from worker.secret_refs import SecretRef, SecretResolver

log = get_logger(__name__)

DEFAULT_TIMEOUT_S = 15.0
DEFAULT_RATE_LIMIT_BACKOFF_S = 1.0


class MissingScope(PermanentError):
    """The scoped API answered 403: the token lacks a scope (named in the message)."""

    def __init__(self, message: str, *, scopes: list[str]) -> None:
        super().__init__(message)
        self.scopes = scopes


class _Rejected(Exception):
    """The token endpoint refused the client's credential (``invalid_client``/401)."""


def insufficient_scope(header: str | None) -> list[str]:
    """The scopes an RFC 6750 ``WWW-Authenticate: Bearer error="insufficient_scope", scope="a b"`` names."""
    if not header:
        return []
    match = re.search(r'scope="([^"]*)"', header)
    return match.group(1).split() if match else []


class OAuthClientProvider:
    """A ``Provider`` for an ``OAuthClientProviderSpec``."""

    def __init__(self, name: str, spec: OAuthClientProviderSpec, *, resolve: SecretResolver, limiter: RateLimiter,
                 http: httpx.Client | None = None, clock: Callable[[], datetime] = utcnow, timeout: float | None = None,
                 attempts: int = 3, sleep: Callable[[float], None] = time.sleep,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.spec = spec
        self.mode = Mode.overlap
        self.can_issue = True
        self.can_revoke = True
        self.can_list = True
        self._resolve = resolve
        self._limiter = limiter
        self._clock = clock
        self._sleep = sleep
        self._monotonic = monotonic
        self._attempts = max(1, attempts)
        self._timeout = timeout or (spec.timeout.total_seconds() if spec.timeout else DEFAULT_TIMEOUT_S)
        limiter.register(name, RateLimit(spec.rate_limit.requests, spec.rate_limit.per.total_seconds()))
        self._owns_http = http is None
        if http is None:
            verify = check_tls_verify("provider", name, spec.tls_verify)
            note_insecure_http("provider", name, list(spec.call_urls().values()))
            http = httpx.Client(verify=verify, follow_redirects=False, timeout=self._timeout)
        self._http = http

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> "OAuthClientProvider":
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ the Provider protocol
    def issue(self, *, name: str, credential_type: str, labels: dict[str, str]) -> IssuedCredential:
        self._known_type(credential_type)
        expires_at = self._clock() + self.spec.key_lifetime if self.spec.key_lifetime else None
        variables = self._variables(key_name=name, expires_at=expires_at)
        if credential_type == PRIVATE_KEY_JWT:
            pair = generate_key_pair(self.spec.key_pair.algorithm, self.spec.key_pair.rsa_bits)
            self._register_jwk(pair, variables)
            return IssuedCredential(secret=pair.private_pem, key_id=pair.kid, name=name, expires_at=expires_at)
        call = self._admin_call("add_secret")
        # Not retried here: a POST whose answer was lost may have added a secret we cannot read back.
        response = self._request("issue", call.method, self._admin_url(call, variables), attempts=1,
                                 json_body=self._body(call, variables, None), timeout=self._call_timeout(call))
        document = self._json(response, "issue")
        value = self._field(document, call.response.secret, "issue")
        key_id = self._field(document, call.response.key_id, "issue")
        if not isinstance(value, str) or not value or key_id in (None, ""):
            raise GarbageResponse(f"provider {self.name!r} issue: the answer has no new secret and id at "
                                  f"{call.response.secret} / {call.response.key_id}")
        if call.response.expires_at:
            expires_at = parse_time(optional_at(document, call.response.expires_at)) or expires_at
        return IssuedCredential(secret=Secret(value), key_id=str(key_id), name=name, expires_at=expires_at)

    def check(self, secret: Secret, *, credential_type: str) -> CheckOutcome:
        self._known_type(credential_type)
        try:
            token, granted = self._token(secret, credential_type)
        except _Rejected:
            return CheckOutcome.invalid
        call = self.spec.scoped_call
        response = self._request("check", call.method, call.url, bearer=token, expect_json=False)
        if response.status_code == 401:
            return CheckOutcome.invalid
        if response.status_code == 403:
            wanted = insufficient_scope(response.headers.get("WWW-Authenticate"))
            missing = wanted or [s for s in self.spec.scopes if granted is not None and s not in granted] or list(self.spec.scopes)
            named = ", ".join(repr(s) for s in missing)
            raise MissingScope(
                f"provider {self.name!r}: {call.method} {_safe(call.url)} answered 403: the token of client "
                f"{self.spec.client_id!r} lacks the scope {named} (granted: {' '.join(granted or []) or 'none'}); "
                f"grant it to the client at the authorization server or fix 'scopes' in the inventory",
                scopes=missing)
        return CheckOutcome.valid

    def identify(self, secret: Secret, *, credential_type: str) -> tuple[CheckOutcome, str | None]:
        """``check``, plus the key's id where it follows from the credential: a private key's ``kid``
        (``keyrotor adopt`` records it; a client secret's id must be given with ``--key-id``)."""
        outcome = self.check(secret, credential_type=credential_type)
        if outcome is CheckOutcome.valid and credential_type == PRIVATE_KEY_JWT:
            return outcome, key_pair_from_pem(secret, self.spec.key_pair.algorithm).kid
        return outcome, None

    def revoke(self, *, key_id: str | None, secret: Secret | None, credential_type: str) -> RevokeOutcome:
        if not credential_type and key_id is not None:
            credential_type = self._type_of(key_id)  # an orphan whose run no longer says (the scan passes "")
        self._known_type(credential_type)
        if key_id is None and secret is not None and credential_type == PRIVATE_KEY_JWT:
            key_id = key_pair_from_pem(secret, self.spec.key_pair.algorithm).kid
        if key_id is None:
            raise PermanentError(f"provider {self.name!r} revoke: no id for the {credential_type} to remove")
        call = self._admin_call("remove_jwk" if credential_type == PRIVATE_KEY_JWT else "remove_secret")
        response = self._request("revoke", call.method, self._admin_url(call, self._variables(key_id=key_id)),
                                 not_found_ok=True, expect_json=False, timeout=self._call_timeout(call))
        return RevokeOutcome.already_gone if response.status_code == 404 else RevokeOutcome.revoked

    def list_keys(self) -> list[ProviderKeyInfo]:
        keys: list[ProviderKeyInfo] = []
        for ctype, call_name in ((PRIVATE_KEY_JWT, "list_jwks"), (CLIENT_SECRET, "list_secrets")):
            if ctype in self.spec.credential_types:
                keys.extend(self._list(call_name))
        return keys

    def _type_of(self, key_id: str) -> str:
        """Which list holds ``key_id`` (JWKs first); ``""`` when neither does."""
        for ctype, call_name in ((PRIVATE_KEY_JWT, "list_jwks"), (CLIENT_SECRET, "list_secrets")):
            if ctype in self.spec.credential_types and any(k.key_id == key_id for k in self._list(call_name)):
                return ctype
        return ""

    @property
    def issue_timeout_s(self) -> float:
        calls = self.spec.admin.calls
        timeouts = [self._call_timeout(c) for c in (calls.add_jwk, calls.add_secret) if c is not None]
        return max(timeouts, default=self._timeout)

    # ------------------------------------------------------------------ JWKs
    def _register_jwk(self, pair: KeyPair, variables: dict[str, Any]) -> None:
        call = self._admin_call("add_jwk")
        variables = {**variables, "key_id": pair.kid}
        try:
            self._request("issue", call.method, self._admin_url(call, variables), attempts=1, expect_json=False,
                          json_body=self._body(call, variables, pair), timeout=self._call_timeout(call))
        except RateLimited:
            raise  # a refusal: nothing was registered
        except TransientError as lost:
            # The answer was lost, not necessarily the registration: look for the kid before anyone retries.
            try:
                landed = any(k.key_id == pair.kid for k in self._list("list_jwks"))
            except TransientError:
                raise lost from None
            log.warning("oauth_jwk_registration_settled", provider=self.name, kid=pair.kid, landed=landed,
                        error=type(lost).__name__)
            if not landed:
                raise lost from None

    def _list(self, call_name: str) -> list[ProviderKeyInfo]:
        call = self._admin_call(call_name)
        response = self._request("list", call.method, self._admin_url(call, self._variables()), timeout=self._call_timeout(call))
        document = self._json(response, "list")
        paths = call.response
        items = self._field(document, paths.items or "$", "list")
        if not isinstance(items, list):
            raise GarbageResponse(f"provider {self.name!r} list: the answer at {paths.items or '$'} is not a list")
        found: list[ProviderKeyInfo] = []
        for item in items:
            key_id = optional_at(item, paths.key_id)
            name = optional_at(item, paths.name)
            found.append(ProviderKeyInfo(key_id=None if key_id is None else str(key_id),
                                         name=None if name is None else str(name),
                                         created_at=parse_time(optional_at(item, paths.created_at)),
                                         live=listed_live(optional_at(item, paths.revoked))))
        return found

    # ------------------------------------------------------------------ tokens
    def _token(self, secret: Secret, credential_type: str) -> tuple[str, list[str] | None]:
        """(access token, granted scopes or None when the answer does not say) for the configured scopes."""
        form = {**self.spec.token_params, "grant_type": "client_credentials", "scope": " ".join(self.spec.scopes)}
        basic: tuple[str, str] | None = None
        if credential_type == PRIVATE_KEY_JWT:
            form.update(client_id=self.spec.client_id, client_assertion_type=JWT_BEARER_ASSERTION,
                        client_assertion=client_assertion(
                            secret, algorithm=self.spec.key_pair.algorithm, client_id=self.spec.client_id,
                            audience=self.spec.assertion_audience, lifetime_s=self.spec.assertion_lifetime.total_seconds(),
                            now=self._clock().timestamp()))
        elif self.spec.client_secret_auth == "client_secret_post":
            form.update(client_id=self.spec.client_id, client_secret=secret.reveal())
        else:  # RFC 6749 2.3.1: both parts form-urlencoded before Basic encoding
            basic = (quote(self.spec.client_id, safe=""), quote(secret.reveal(), safe=""))
        # Sent once: a resend after a lost answer would replay the assertion's jti, which the server
        # must refuse (RFC 7523 3); precheck and verify poll check() again with a fresh assertion.
        response = self._request("token", "POST", self.spec.token_url, form=form, basic=basic, attempts=1,
                                 token_endpoint=True, expect_json=False)
        if response.status_code in (400, 401):
            error = self._oauth_error(response)
            if response.status_code == 401 or error in ("invalid_client", "unauthorized_client", "invalid_grant"):
                raise _Rejected()
            if error == "invalid_scope":
                raise MissingScope(f"provider {self.name!r}: the token endpoint refused the scopes "
                                   f"{' '.join(self.spec.scopes)!r} for client {self.spec.client_id!r} (invalid_scope); "
                                   f"grant them to the client at the authorization server", scopes=list(self.spec.scopes))
            raise PermanentError(f"provider {self.name!r}: the token endpoint answered {response.status_code} "
                                 f"{error or 'without an OAuth error code'}")
        document = self._json(response, "token")
        token = document.get("access_token") if isinstance(document, dict) else None
        if not isinstance(token, str) or not token:
            raise GarbageResponse(f"provider {self.name!r}: the token endpoint's answer has no access_token")
        scope = document.get("scope")
        return token, scope.split() if isinstance(scope, str) else None

    @staticmethod
    def _oauth_error(response: httpx.Response) -> str | None:
        try:
            error = response.json().get("error")
        except (ValueError, AttributeError):
            return None
        return error if isinstance(error, str) and error.replace("_", "").isalpha() else None

    # ------------------------------------------------------------------ HTTP
    def _request(self, call_name: str, method: str, url: str, *, attempts: int | None = None,
                 json_body: Any = None, form: Mapping[str, str] | None = None, basic: tuple[str, str] | None = None,
                 bearer: str | None = None, not_found_ok: bool = False, expect_json: bool = True,
                 token_endpoint: bool = False, timeout: float | None = None) -> httpx.Response:
        def once() -> httpx.Response:
            return self._send_once(call_name, method, url, json_body=json_body, form=form, basic=basic, bearer=bearer,
                                   not_found_ok=not_found_ok, token_endpoint=token_endpoint, timeout=timeout)

        return retry_call(once, attempts=attempts or self._attempts, base_delay=0.2, max_delay=5.0, sleep=self._sleep,
                          on_retry=lambda n, exc, delay: log.info("provider_call_retry", provider=self.name, call=call_name,
                                                                  attempt=n, error=type(exc).__name__, delay_s=round(delay, 3)))

    def _send_once(self, call_name: str, method: str, url: str, *, json_body: Any, form: Mapping[str, str] | None,
                   basic: tuple[str, str] | None, bearer: str | None, not_found_ok: bool, token_endpoint: bool,
                   timeout: float | None) -> httpx.Response:
        shown = _safe(url)
        headers = {"Accept": "application/json"}
        if bearer is not None:
            headers["Authorization"] = f"Bearer {bearer}"
        elif call_name not in ("token", "check"):
            headers.update(self._admin_auth())  # read before the slot is taken: the slot counts until the answer
        auth = httpx.BasicAuth(*basic) if basic else None
        started = time.monotonic()
        try:
            with self._limiter.slot(self.name, hold_s=(timeout or self._timeout) + LEASE_MARGIN_S):
                started = time.monotonic()
                response = self._http.request(method, url, headers=headers, json=json_body, data=dict(form) if form else None,
                                              auth=auth, timeout=timeout or self._timeout)
        except httpx.TimeoutException:
            self._log(call_name, method, shown, None, started, "timeout")
            raise TransientError(f"provider {self.name!r} {call_name}: {method} {shown} timed out") from None
        except httpx.TransportError as exc:
            self._log(call_name, method, shown, None, started, type(exc).__name__)
            raise TransientError(f"provider {self.name!r} {call_name}: {method} {shown} failed ({type(exc).__name__})") from None
        status = response.status_code
        self._log(call_name, method, shown, status, started, None)
        where = f"provider {self.name!r} {call_name}: {method} {shown} answered {status}"
        if 200 <= status < 300:
            return response
        if status == 429:
            retry_after = parse_retry_after(response.headers.get("Retry-After"), now=self._clock())
            self._limiter.block(self.name, retry_after if retry_after is not None else DEFAULT_RATE_LIMIT_BACKOFF_S)
            raise RateLimited(f"{where} (rate limited)", retry_after=retry_after)
        if status >= 500:
            raise TransientError(f"{where} (server error; retry later)",
                                 retry_after=parse_retry_after(response.headers.get("Retry-After"), now=self._clock()))
        if token_endpoint and status in (400, 401):
            return response  # OAuth errors: read by _token
        if call_name == "check" and status in (401, 403):
            return response  # the scoped API's verdict: read by check
        if status == 404 and not_found_ok:
            return response
        if status in (401, 403):
            raise PermanentError(f"{where}: the admin API refused keyrotor's management credential "
                                 f"(check admin.auth in the inventory and its rights at the authorization server)")
        raise PermanentError(f"{where} (client error; check the call's URL, body and auth in the inventory)")

    def _admin_secret(self, value: SecretRef | str) -> Secret:
        # The auth specs are shared with verify calls, where "{secret}" (the credential being
        # checked) is allowed; the inventory refuses it for admin.auth, so only a reference is here.
        if not isinstance(value, SecretRef):
            raise ConfigError(f"provider {self.name!r}: admin.auth must use a {{vault: ...}} or {{env: ...}} reference")
        return self._resolve(value)

    def _admin_auth(self) -> dict[str, str]:
        auth = self.spec.admin.auth
        if isinstance(auth, BearerAuthSpec):
            return {"Authorization": f"Bearer {self._admin_secret(auth.token).reveal()}"}
        if isinstance(auth, HeaderAuthSpec):
            return {auth.name: self._admin_secret(auth.value).reveal()}
        if isinstance(auth, BasicAuthSpec):
            password = self._admin_secret(auth.password).reveal()
            return {"Authorization": "Basic " + b64encode(f"{auth.username}:{password}".encode()).decode("ascii")}
        raise PermanentError(f"provider {self.name!r}: admin.auth type {auth.type!r} is not supported for the admin API")

    def _log(self, call_name: str, method: str, url: str, status: int | None, started: float, error: str | None) -> None:
        count_request(self.name, call_name, str(status) if status is not None else (error or "error"))
        log.info("provider_request", provider=self.name, call=call_name, method=method, url=url, status=status,
                 error=error, duration_ms=round((time.monotonic() - started) * 1000, 1))

    # ------------------------------------------------------------------ templates and answers
    def _variables(self, *, key_name: str | None = None, key_id: str | None = None,
                   expires_at: datetime | None = None) -> dict[str, Any]:
        run_id = key_name[len("keyrotor-"):] if key_name and key_name.startswith("keyrotor-") else None
        return {"base_url": self.spec.admin.base_url, "client_id": self.spec.client_id, "key_id": key_id,
                "key_name": key_name, "run_id": run_id,
                "expires_at": expires_at.astimezone(timezone.utc).isoformat().replace("+00:00", "Z") if expires_at else None}

    def _admin_url(self, call: AdminCallSpec, variables: Mapping[str, Any]) -> str:
        try:
            return render_url(call.url, variables)
        except ConfigError as exc:
            raise PermanentError(f"provider {self.name!r}: {exc}") from None

    def _body(self, call: AdminCallSpec, variables: Mapping[str, Any], pair: KeyPair | None) -> Any:
        def fill(value: Any) -> Any:
            if value == JWK_VALUE and pair is not None:
                return dict(pair.public_jwk)
            if value == PUBLIC_KEY_PEM_VALUE and pair is not None:
                return pair.public_pem
            if isinstance(value, str):
                return render(value, variables)
            if isinstance(value, Mapping):
                return {str(k): fill(v) for k, v in value.items()}
            if isinstance(value, list):
                return [fill(v) for v in value]
            return value

        try:
            return fill(call.body) if call.body is not None else None
        except ConfigError as exc:
            raise PermanentError(f"provider {self.name!r}: {exc}") from None

    def _admin_call(self, name: str) -> AdminCallSpec:
        call = getattr(self.spec.admin.calls, name)
        if call is None:
            raise PermanentError(f"provider {self.name!r} declares no admin call {name!r} (add admin.calls.{name})")
        return call

    def _call_timeout(self, call: AdminCallSpec | None) -> float:
        return call.timeout.total_seconds() if call is not None and call.timeout else self._timeout

    def _known_type(self, credential_type: str) -> None:
        if credential_type not in self.spec.credential_types:
            raise PermanentError(f"provider {self.name!r} has no credential type {credential_type!r} "
                                 f"(known: {', '.join(sorted(self.spec.credential_types))})")

    def _json(self, response: httpx.Response, call_name: str) -> Any:
        try:
            return response.json()
        except (ValueError, UnicodeDecodeError):
            raise GarbageResponse(f"provider {self.name!r} {call_name}: answered {response.status_code} with a body "
                                  f"that is not JSON") from None

    def _field(self, document: Any, path: str | None, call_name: str) -> Any:
        return field_at(document, path, f"provider {self.name!r} {call_name}")


def _safe(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))

