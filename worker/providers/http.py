"""The generic HTTP provider: issue / verify / revoke / list calls declared in the inventory.

Each call is a method, URL template, headers, JSON body template, auth and JSON paths into the
answer. Answers are classified the same way for every provider:

  2xx                         success (a body that should be JSON and is not → ``GarbageResponse``)
  401/403 (status_codes.invalid)      ``check`` → ``invalid``; elsewhere ``InvalidCredential``
  status_codes.deprecated (e.g. 434)  ``check`` → ``deprecated``; elsewhere ``DeprecatedCredential``
  429                         ``RateLimited(retry_after)``; every worker is told to back off
  5xx, timeouts, connection errors    ``TransientError``
  404 on revoke               already gone (success)
  other 4xx                   ``PermanentError``

Secrets are rendered into headers/bodies only when the request is built; the log line carries the
method, the URL without its query (and with any ``{secret}`` blanked), the status and duration.
"""

from __future__ import annotations

import json
import os
import ssl
import tempfile
import time
from base64 import b64encode
from datetime import datetime
from typing import Any, Callable, Mapping
from urllib.parse import urlencode, urlsplit, urlunsplit

import httpx

from worker.clock import utcnow
from worker.errors import (
    ConfigError,
    DeprecatedCredential,
    GarbageResponse,
    InvalidCredential,
    PermanentError,
    RateLimited,
    TransientError,
)
from worker.http_security import check_tls_verify, note_insecure_http
from worker.inventory.error_matchers import first_match
from worker.inventory.field_types import SECRET_TEMPLATE
from worker.inventory.provider_parts import (
    BasicAuthSpec,
    BearerAuthSpec,
    HeaderAuthSpec,
    HttpCallSpec,
    MtlsAuthSpec,
    RequestStepSpec,
)
from worker.inventory.schema import HttpProviderSpec
from worker.log import get_logger
from worker.providers.base import (
    CheckOutcome,
    IssuedCredential,
    ProviderKeyInfo,
    RevokeOutcome,
    wait_until_live,
)
from worker.providers.client import ProviderClient
from worker.protocol.states import Mode
from worker.providers.answers import count_request as _metric
from worker.providers.answers import field_at, listed_live, optional_at
from worker.providers.answers import parse_time as _parse_time
from worker.providers.limits import ProviderLimits
from worker.providers.ratelimit import LEASE_MARGIN_S, RateLimiter
from worker.providers.request_parts import Revealed, fill, matched_error, vendor_message
from worker.providers.templating import render_url
from worker.retry import parse_retry_after, retry_call
from worker.secret import Secret
from worker.secret_refs import SecretResolver

log = get_logger(__name__)

DEFAULT_TIMEOUT_S = 15.0
#: When a 429 carries no usable Retry-After, everyone still backs off this long.
DEFAULT_RATE_LIMIT_BACKOFF_S = 1.0
_REDACTED = "[REDACTED]"


def _mtls_context(auth: MtlsAuthSpec, resolve: SecretResolver) -> ssl.SSLContext:
    """An SSL context presenting the client certificate; the private key (from Vault/env) touches
    disk only inside a private temp dir for the instant ``load_cert_chain`` needs a file."""
    context = ssl.create_default_context(cafile=auth.ca_file) if auth.ca_file else ssl.create_default_context()
    key_pem = resolve(auth.key)
    with tempfile.TemporaryDirectory(prefix="keyrotor-mtls-") as directory:
        key_path = os.path.join(directory, "client.key")
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(key_pem.reveal())
        try:
            context.load_cert_chain(auth.cert_file, keyfile=key_path)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"mTLS: cannot load client certificate {auth.cert_file} with its key: {type(exc).__name__}") from None
    return context


class HttpProvider:
    """A ``Provider`` driven by an ``HttpProviderSpec``."""

    def __init__(
        self,
        name: str,
        spec: HttpProviderSpec,
        *,
        resolve: SecretResolver,
        limiter: RateLimiter,
        http: httpx.Client | None = None,
        clock: Callable[[], datetime] = utcnow,
        timeout: float | None = None,
        attempts: int = 3,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.spec = spec
        self.mode = Mode(spec.mode)
        self.can_issue = self._declares("issue") and self.mode is not Mode.assisted
        self.can_revoke = self._declares("revoke")
        self.can_list = spec.calls.list is not None
        self._resolve = resolve
        self._clock = clock
        self._sleep = sleep
        self._monotonic = monotonic
        self._attempts = max(1, attempts)
        self._timeout = timeout or (spec.timeout.total_seconds() if spec.timeout else DEFAULT_TIMEOUT_S)
        self._limits = ProviderLimits(name, spec, limiter, lease_s=self._longest_call_s() + LEASE_MARGIN_S)
        self._owns_http = http is None
        self._http = http if http is not None else self._make_client()

    def _longest_call_s(self) -> float:
        calls = [getattr(self.spec.calls, n) for n in ("issue", "verify", "revoke", "list")]
        return max([self._timeout] + [c.timeout.total_seconds() for c in calls if c is not None and c.timeout])

    # ------------------------------------------------------------------ lifecycle
    def _make_client(self) -> httpx.Client:
        tls_verify = check_tls_verify("provider", self.name, self.spec.tls_verify)
        note_insecure_http("provider", self.name, list(self.spec.call_urls().values()))
        mtls = self.spec.auth if isinstance(self.spec.auth, MtlsAuthSpec) else None
        verify: Any = _mtls_context(mtls, self._resolve) if mtls else tls_verify
        if mtls and not tls_verify:
            verify.check_hostname = False
            verify.verify_mode = ssl.CERT_NONE
        return ProviderClient(verify=verify, follow_redirects=False, timeout=self._timeout)

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> "HttpProvider":
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ the Provider protocol
    def issue(self, *, name: str, credential_type: str, labels: dict[str, str]) -> IssuedCredential:
        call = self._need("issue", credential_type)
        if self.mode is Mode.assisted:
            raise PermanentError(f"provider {self.name!r} is assisted: a person mints its keys (keyrotor deposit), keyrotor cannot issue them")
        self._check_can_issue(credential_type)
        variables = self._variables(credential_type=credential_type, key_name=name, labels=labels)
        # Not retried here: a POST that timed out may still have minted a key. The run's step
        # retries after looking for a key with this run's name (no duplicate, no orphan).
        response = self._request("issue", call, variables, credential_type=credential_type, attempts=1)
        document = self._json(response, "issue")
        paths = call.response
        secret_value = self._field(document, paths.secret, "issue", "secret")
        if not isinstance(secret_value, str) or not secret_value:
            raise GarbageResponse(f"provider {self.name!r} issue: the answer at {paths.secret} is not a non-empty string")
        key_id = self._field(document, paths.key_id, "issue", "key_id") if paths.key_id else None
        expires_at = None
        if paths.expires_at:
            raw = self._optional_field(document, paths.expires_at)
            expires_at = _parse_time(raw)
            if raw not in (None, "") and expires_at is None:
                log.warning("provider_expiry_unreadable", provider=self.name, path=paths.expires_at)
        return IssuedCredential(
            secret=Secret(secret_value),
            key_id=None if key_id is None else str(key_id),
            name=name,
            expires_at=expires_at,
        )

    def check(self, secret: Secret, *, credential_type: str) -> CheckOutcome:
        return self.identify(secret, credential_type=credential_type)[0]

    def identify(self, secret: Secret, *, credential_type: str) -> tuple[CheckOutcome, str | None]:
        """``check``, plus the provider's id of the key when the verify call's answer names it
        (``calls.verify.response.key_id``, e.g. ``$.apiKeyId``); used by ``keyrotor adopt``."""
        call = self._need("verify", credential_type)
        variables = self._variables(credential_type=credential_type, secret=secret)
        try:
            response = self._request("check", call, variables, credential_type=credential_type)
        except DeprecatedCredential:
            return CheckOutcome.deprecated, None
        except InvalidCredential:
            return CheckOutcome.invalid, None
        document = self._json(response, "check", allow_empty=True)  # a 200 HTML page from a proxy is not "valid"
        key_id = self._optional_field(document, call.response.key_id) if call.response.key_id and document else None
        return CheckOutcome.valid, None if key_id in (None, "") else str(key_id)

    def revoke(self, *, key_id: str | None, secret: Secret | None, credential_type: str) -> RevokeOutcome:
        call = self._need("revoke", credential_type)
        variables = self._variables(credential_type=credential_type, key_id=key_id, secret=secret)
        response = self._request("revoke", call, variables, credential_type=credential_type, not_found_ok=True)
        if response.status_code == 404:
            return RevokeOutcome.already_gone
        self._json(response, "revoke", allow_empty=True)
        return RevokeOutcome.revoked

    def list_keys(self) -> list[ProviderKeyInfo]:
        call = self._need("list", None)
        response = self._request("list", call, self._variables(credential_type=None), credential_type=None)
        document = self._json(response, "list")
        paths = call.response
        items = self._field(document, paths.items or "$", "list", "items")
        if not isinstance(items, list):
            raise GarbageResponse(f"provider {self.name!r} list: the answer at {paths.items or '$'} is not a list")
        keys: list[ProviderKeyInfo] = []
        for item in items:
            key_id = self._optional_field(item, paths.key_id) if paths.key_id else None
            name = self._optional_field(item, paths.name) if paths.name else None
            created = _parse_time(self._optional_field(item, paths.created_at)) if paths.created_at else None
            hint = self._optional_field(item, paths.secret_hint) if paths.secret_hint else None
            keys.append(ProviderKeyInfo(
                key_id=None if key_id is None else str(key_id),
                name=None if name is None else str(name),
                created_at=created,
                live=self._listed_live(item, paths.revoked),
                hint=hint if isinstance(hint, str) and hint else None,
            ))
        return keys

    @property
    def issue_timeout_s(self) -> float:
        """How long an issue call may take before the client gives up (its answer is then unknown)."""
        call = self.spec.calls.issue
        return call.timeout.total_seconds() if call is not None and call.timeout else self._timeout

    def _listed_live(self, item: Any, revoked_path: str | None) -> bool | None:
        """``response.revoked`` names a flag in each listed item (true/"revoked"/"inactive"… = not
        live); without it, or when the item has no such field, liveness is unknown (``None``)."""
        if not revoked_path:
            return None
        return listed_live(self._optional_field(item, revoked_path))

    def wait_until_live(self, secret: Secret, credential_type: str, timeout: float | None = None,
                        poll_interval: float | None = None, sleep: Callable[[float], None] | None = None) -> CheckOutcome:
        """Poll ``check`` until the new credential is accepted or the activation timeout passes."""
        return wait_until_live(
            self, secret, credential_type,
            timeout=timeout if timeout is not None else self.spec.activation.timeout.total_seconds(),
            poll_interval=poll_interval if poll_interval is not None else self.spec.activation.poll_interval.total_seconds(),
            sleep=sleep or self._sleep,
            monotonic=self._monotonic,
        )

    # ------------------------------------------------------------------ helpers
    def _declares(self, call: str) -> bool:
        return getattr(self.spec.calls, call) is not None or any(
            t.calls is not None and getattr(t.calls, call) is not None for t in self.spec.credential_types.values())

    def _need(self, call: str, credential_type: str | None) -> HttpCallSpec:
        spec = self.spec.call_for(call, credential_type)
        if spec is None:
            raise PermanentError(f"provider {self.name!r} declares no '{call}' call (add calls.{call} to the inventory)")
        return spec

    def _check_can_issue(self, credential_type: str) -> None:
        ctype = self.spec.credential_types.get(credential_type)
        if ctype is None:
            raise PermanentError(f"provider {self.name!r} has no credential type {credential_type!r} (known: {', '.join(sorted(self.spec.credential_types))})")
        phase = ctype.phase_at(self._clock())
        if phase is not None:
            target = f"; rotate to {ctype.replacement!r} instead" if ctype.replacement else ""
            raise PermanentError(
                f"provider {self.name!r} no longer issues {credential_type!r} credentials "
                f"(deprecation phase {phase.phase} since {phase.from_.isoformat()}){target}"
            )

    def _variables(self, *, credential_type: str | None, key_name: str | None = None, key_id: str | None = None,
                   secret: Secret | None = None, labels: Mapping[str, str] | None = None) -> dict[str, Any]:
        run_id = key_name[len("keyrotor-"):] if key_name and key_name.startswith("keyrotor-") else None
        return {
            "base_url": self.spec.base_url,
            "key_name": key_name,
            "key_id": key_id,
            "secret": secret,
            "run_id": run_id,
            "credential_type": credential_type,
            "labels": dict(labels or {}),
            "key_slug": None,
            "captured": {},
        }

    def _credential(self, value: Any, variables: Mapping[str, Any], revealed: Revealed) -> Secret:
        if value == SECRET_TEMPLATE:
            secret = variables.get("secret")
            if not isinstance(secret, Secret):
                raise PermanentError(f"provider {self.name!r}: this call authenticates with the credential, but none was given")
            return secret
        secret = self._resolve(value)
        revealed.add(secret.reveal())
        return secret

    def _auth_headers(self, call: HttpCallSpec | RequestStepSpec, variables: Mapping[str, Any], revealed: Revealed) -> dict[str, str]:
        auth = call.auth or self.spec.auth
        if isinstance(auth, BearerAuthSpec):
            return {"Authorization": f"Bearer {self._credential(auth.token, variables, revealed).reveal()}"}
        if isinstance(auth, HeaderAuthSpec):
            return {auth.name: self._credential(auth.value, variables, revealed).reveal()}
        if isinstance(auth, BasicAuthSpec):
            password = self._credential(auth.password, variables, revealed).reveal()
            return {"Authorization": "Basic " + b64encode(f"{auth.username}:{password}".encode()).decode("ascii")}
        return {}  # mTLS is the client's certificate; no auth: nothing to add

    def _deprecation_headers(self, call_name: str, credential_type: str | None) -> dict[str, str]:
        if credential_type is None:
            return {}
        ctype = self.spec.credential_types.get(credential_type)
        headers = ctype.headers_at(self._clock()) if ctype else {}
        if headers:
            log.warning("provider_credential_in_amnesty", provider=self.name, call=call_name,
                        credential_type=credential_type, replacement=ctype.replacement if ctype else None,
                        headers=sorted(headers))
        return headers

    def _safe_url(self, call: HttpCallSpec | RequestStepSpec, variables: Mapping[str, Any]) -> str:
        captured = variables.get("captured") or {}
        shown = dict(variables, secret=_REDACTED if variables.get("secret") is not None else None,
                     captured={name: _REDACTED for name in captured})
        try:
            parts = urlsplit(render_url(call.url, shown))
        except ConfigError:
            return call.url
        return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))

    def _build(self, call_name: str, call: HttpCallSpec | RequestStepSpec, variables: Mapping[str, Any],
               credential_type: str | None, revealed: Revealed) -> httpx.Request:
        try:
            url = render_url(call.url, variables)
            headers = {name: fill(value, variables, self._resolve, revealed) for name, value in call.headers.items()}
            params = {name: fill(value, variables, self._resolve, revealed) for name, value in call.query.items()}
            content: bytes | None = None
            if call.form:
                content = urlencode({name: fill(v, variables, self._resolve, revealed) for name, v in call.form.items()}).encode("ascii")
                headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
            elif isinstance(call.body, str):
                content = fill(call.body, variables, self._resolve, revealed).encode("utf-8")
            elif call.body is not None:
                content = json.dumps(fill(call.body, variables, self._resolve, revealed)).encode("utf-8")
                headers.setdefault("Content-Type", "application/json")
        except ConfigError as exc:
            raise PermanentError(f"provider {self.name!r} {call_name}: {exc}") from None
        headers.setdefault("Accept", "application/json")
        headers.update(self._deprecation_headers(call_name, credential_type))
        headers.update(self._auth_headers(call, variables, revealed))
        timeout = call.timeout.total_seconds() if call.timeout else self._timeout
        return self._http.build_request(call.method, url, params=params or None, headers=headers, content=content, timeout=timeout)

    def _request(self, call_name: str, call: HttpCallSpec, variables: Mapping[str, Any], *,
                 credential_type: str | None, attempts: int | None = None, not_found_ok: bool = False) -> httpx.Response:
        """The call's ``before`` steps in order (each retried on its own: a login is idempotent),
        their captures feeding the later requests, then the call itself."""
        if call.before:
            variables = self._run_steps(call_name, call, variables, credential_type)

        def once() -> httpx.Response:
            return self._send_once(call_name, call, variables, credential_type, not_found_ok)

        return retry_call(
            once,
            attempts=attempts or self._attempts,
            base_delay=0.2,
            max_delay=5.0,
            sleep=self._sleep,
            on_retry=lambda n, exc, delay: log.info("provider_call_retry", provider=self.name, call=call_name,
                                                    attempt=n, error=type(exc).__name__, delay_s=round(delay, 3)),
        )

    def _run_steps(self, call_name: str, call: HttpCallSpec, variables: Mapping[str, Any],
                   credential_type: str | None) -> dict[str, Any]:
        captured: dict[str, Secret] = {}
        filled = dict(variables, captured=captured)
        for step in call.before:
            where = f"{call_name}/{step.name}"

            def once(step: RequestStepSpec = step, where: str = where) -> httpx.Response:
                return self._send_once(where, step, filled, credential_type, False)

            def on_retry(n: int, exc: BaseException, delay: float, where: str = where) -> None:
                log.info("provider_call_retry", provider=self.name, call=where, attempt=n,
                         error=type(exc).__name__, delay_s=round(delay, 3))

            response = retry_call(
                once, attempts=self._attempts, base_delay=0.2, max_delay=5.0, sleep=self._sleep, on_retry=on_retry,
            )
            if not step.capture:
                continue  # its answer feeds nothing: any 2xx will do
            document = self._json(response, where)
            for name, path in step.capture.items():
                value = self._field(document, path, where, f"capture.{name}")
                if value is None or value == "" or isinstance(value, (dict, list)):
                    raise GarbageResponse(f"provider {self.name!r} {where}: the answer at {path} is not a value to capture")
                captured[name] = Secret(str(value))
        return filled

    def _send_once(self, call_name: str, call: HttpCallSpec | RequestStepSpec, variables: Mapping[str, Any],
                   credential_type: str | None, not_found_ok: bool) -> httpx.Response:
        safe_url = self._safe_url(call, variables)
        if self._http.is_closed:
            # Replaced by an adapter built from a changed record (`config apply`) while a chain held
            # this one: nothing is sent, and the step's retry reads the record and builds anew.
            raise TransientError(f"provider {self.name!r} {call_name}: its adapter was replaced by a changed "
                                 "inventory record; retried with the new one")
        revealed = Revealed()
        # Built (secret references read from Vault/env) before a slot is taken: the slot counts
        # from when it is taken until the answer, so nothing slow may sit between it and the send.
        request = self._build(call_name, call, variables, credential_type, revealed)
        started = time.monotonic()
        try:
            with self._limits.sending(call.method, safe_url):
                started = time.monotonic()
                response = self._http.send(request)
                response.read()
        except httpx.TimeoutException:
            self._log(call_name, call.method, safe_url, None, started, "timeout")
            raise TransientError(f"provider {self.name!r} {call_name}: {call.method} {safe_url} timed out") from None
        except httpx.TransportError as exc:
            self._log(call_name, call.method, safe_url, None, started, type(exc).__name__)
            raise TransientError(f"provider {self.name!r} {call_name}: {call.method} {safe_url} failed ({type(exc).__name__})") from None
        status = response.status_code
        self._log(call_name, call.method, safe_url, status, started, None)
        where = f"provider {self.name!r} {call_name}: {call.method} {safe_url} answered {status}"
        matcher = first_match([*call.errors, *self.spec.errors], status, response.text) if (call.errors or self.spec.errors) else None
        if matcher is not None:
            retry_after = parse_retry_after(response.headers.get("Retry-After"), now=self._clock())
            error = matched_error(matcher, where, vendor_message(response, matcher, revealed), retry_after)
            log.info("provider_answer_matched", provider=self.name, call=call_name, status=status, outcome=matcher.outcome)
            if error is None:
                return response
            if isinstance(error, RateLimited):
                self._limits.block(retry_after if retry_after is not None else DEFAULT_RATE_LIMIT_BACKOFF_S)
            raise error
        if 200 <= status < 300:
            return response
        if status == 429:
            retry_after = parse_retry_after(response.headers.get("Retry-After"), now=self._clock())
            self._limits.block(retry_after if retry_after is not None else DEFAULT_RATE_LIMIT_BACKOFF_S)
            raise RateLimited(f"{where} (rate limited)", retry_after=retry_after)
        if status in self.spec.status_codes.deprecated:
            raise DeprecatedCredential(f"{where}: the {credential_type or 'credential'} type is deprecated at the provider")
        if status in self.spec.status_codes.invalid:
            raise InvalidCredential(f"{where}: the credential was rejected")
        if status == 404 and not_found_ok:
            return response
        if status >= 500:
            raise TransientError(f"{where} (server error; retry later)",
                                 retry_after=parse_retry_after(response.headers.get("Retry-After"), now=self._clock()))
        raise PermanentError(f"{where} (client error; check the call's URL, body and auth in the inventory)")

    def _log(self, call_name: str, method: str, url: str, status: int | None, started: float, error: str | None) -> None:
        duration_ms = round((time.monotonic() - started) * 1000, 1)
        _metric(self.name, call_name, str(status) if status is not None else (error or "error"))
        log.info("provider_request", provider=self.name, call=call_name, method=method, url=url,
                 status=status, error=error, duration_ms=duration_ms)

    def _json(self, response: httpx.Response, call_name: str, allow_empty: bool = False) -> Any:
        if allow_empty and not response.content.strip():
            return None
        try:
            return response.json()
        except (ValueError, UnicodeDecodeError):
            content_type = response.headers.get("Content-Type", "none")
            raise GarbageResponse(
                f"provider {self.name!r} {call_name}: answered {response.status_code} with a body that is not JSON "
                f"(Content-Type {content_type}); often a proxy or gateway hiccup"
            ) from None

    def _field(self, document: Any, path: str | None, call_name: str, what: str) -> Any:
        if path is None:
            raise PermanentError(f"provider {self.name!r} {call_name}: no response.{what} path is configured")
        return field_at(document, path, f"provider {self.name!r} {call_name}")

    @staticmethod
    def _optional_field(document: Any, path: str | None) -> Any:
        return optional_at(document, path)
