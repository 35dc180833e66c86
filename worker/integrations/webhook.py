"""Signed webhook integration: tell a consumer a new version exists; check what it reports.

The body is the announcement (key, run id, provider key id, fingerprint, Vault mount/path/version)
— the secret itself only when ``include_secret`` is true. The consumer reloads from Vault; keyrotor
then GETs its ``health_url`` and compares the fingerprint it reports with the announced one.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

import httpx

from worker.errors import GarbageResponse, PermanentError, RateLimited, TransientError
from worker.integrations.base import Announcement, VerifyResult, VerifyStatus
from worker.http_security import check_tls_verify, note_insecure_http
from worker.integrations.signing import EVENT_HEADER, SIGNATURE_HEADER, sign
from worker.inventory.schema import WebhookIntegrationSpec
from worker.log import get_logger
from worker.retry import parse_retry_after, retry_call
from worker.secret_refs import SecretResolver

log = get_logger(__name__)


def _safe(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


class WebhookIntegration:
    def __init__(
        self,
        name: str,
        spec: WebhookIntegrationSpec,
        *,
        resolve: SecretResolver,
        http: httpx.Client | None = None,
        attempts: int = 3,
        sleep: Callable[[float], None] = time.sleep,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.spec = spec
        self._resolve = resolve
        if http is None:
            verify = check_tls_verify("integration", name, spec.tls_verify)
            note_insecure_http("integration", name, [spec.url, spec.health_url])
            http = httpx.Client(follow_redirects=False, verify=verify)
        self._http = http
        self._attempts = max(1, attempts)
        self._sleep = sleep
        self._now = now
        self._timeout = spec.timeout.total_seconds()

    def body(self, announcement: Announcement) -> bytes:
        payload: dict[str, Any] = announcement.public()
        if self.spec.include_secret:
            payload["secret"] = announcement.secret.reveal()
        return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode("utf-8")

    def push(self, announcement: Announcement) -> None:
        body = self.body(announcement)

        def once() -> None:
            # Signed per attempt: a retry minutes later must not carry a stale timestamp.
            headers = {
                "Content-Type": "application/json",
                SIGNATURE_HEADER: sign(self._resolve(self.spec.signing_secret), body, timestamp=int(self._now())),
                EVENT_HEADER: announcement.event,
                "X-Keyrotor-Delivery": f"{announcement.run_id}:{announcement.event}:{announcement.vault_version}",
            }
            self._call("push", "POST", self.spec.url, headers=headers, content=body)

        retry_call(once, attempts=self._attempts, base_delay=0.2, max_delay=5.0, sleep=self._sleep)

    def verify(self, announcement: Announcement) -> VerifyResult:
        if not self.spec.health_url:
            return VerifyResult(VerifyStatus.unchecked, detail="no health_url configured")
        health_url = self.spec.health_url

        def once() -> httpx.Response:
            return self._call("verify", "GET", health_url, headers={"Accept": "application/json"})

        response = retry_call(once, attempts=self._attempts, base_delay=0.2, max_delay=5.0, sleep=self._sleep)
        try:
            document = response.json()
        except ValueError:
            raise GarbageResponse(f"integration {self.name!r}: health URL {_safe(health_url)} did not answer JSON") from None
        reported = document.get("fingerprint") if isinstance(document, dict) else None
        if not isinstance(reported, str):
            raise GarbageResponse(f"integration {self.name!r}: health answer has no 'fingerprint' string")
        if reported != announcement.fingerprint:
            return VerifyResult(VerifyStatus.mismatch, reported, "the consumer reports another key")
        if isinstance(document, dict) and document.get("ok") is False:
            return VerifyResult(VerifyStatus.mismatch, reported, "the consumer holds the key but reports it does not work")
        return VerifyResult(VerifyStatus.ok, reported)

    def _call(self, what: str, method: str, url: str, **kwargs: Any) -> httpx.Response:
        started = time.monotonic()
        where = f"integration {self.name!r} {what}: {method} {_safe(url)}"
        try:
            response = self._http.request(method, url, timeout=self._timeout, **kwargs)
        except httpx.TimeoutException:
            raise TransientError(f"{where} timed out") from None
        except httpx.TransportError as exc:
            raise TransientError(f"{where} failed ({type(exc).__name__})") from None
        status = response.status_code
        log.info("integration_request", integration=self.name, call=what, method=method, url=_safe(url),
                 status=status, duration_ms=round((time.monotonic() - started) * 1000, 1))
        if 200 <= status < 300:
            return response
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        if status == 429:
            raise RateLimited(f"{where} answered 429", retry_after=retry_after)
        if status >= 500:
            raise TransientError(f"{where} answered {status}", retry_after=retry_after)
        if status in (401, 403):
            raise PermanentError(f"{where} answered {status}: the receiver rejected the signature (check both sides use the same signing secret)")
        raise PermanentError(f"{where} answered {status}")
