"""A consumer stand-in: an *external* application that uses a managed key.

It reads its key from Vault itself (hvac, KV v2 mount/path/field), takes keyrotor's signed
webhook (HMAC + timestamp checked, 401 otherwise) as the cue to reload from Vault, and serves:

  POST /hooks/keyrotor  the webhook (reloads; answers the fingerprint it now holds)
  GET  /health          {"ok": <its key works at the provider>, "fingerprint": <of the key it holds>}
  GET  /stats           probe counts, reloads, webhooks accepted/rejected

With ``probe_interval_ms`` a background loop calls the provider with the current key every N ms
and counts failures — the evidence for "no consumer outage during a rotation".
"""

from __future__ import annotations

import json
import threading
import time
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import httpx
import hvac

from worker.integrations.signing import ReplayedDelivery, SignatureError, WebhookVerifier
from keyrotor_sandbox.standin_http import Request, Response, ServerHandle, serve_in_thread, serve_until_signalled
from worker.secret import fingerprint

WEBHOOK_PATH = "/hooks/keyrotor"


@dataclass
class ConsumerConfig:
    vault_addr: str
    vault_token: str = dataclasses.field(repr=False)
    mount: str
    path: str
    field: str
    provider_url: str
    signing_secret: str = dataclasses.field(repr=False)
    check_path: str = "/api/user/me"
    probe_interval_ms: int | None = None
    now: Callable[[], float] = time.time

    @property
    def check_url(self) -> str:
        return self.provider_url.rstrip("/") + self.check_path


@dataclass
class ConsumerStats:
    probes: int = 0
    probe_failures: int = 0
    last_probe_status: int | None = None
    failure_statuses: dict[str, int] = dataclasses.field(default_factory=dict)
    reloads: int = 0
    reload_errors: int = 0
    webhooks_accepted: int = 0
    webhooks_rejected: int = 0
    webhooks_ignored: int = 0
    events: list[str] = dataclasses.field(default_factory=list)


class Consumer:
    """The application: its current key, its Vault client and its counters."""

    def __init__(self, config: ConsumerConfig) -> None:
        self.config = config
        self.stats = ConsumerStats()
        self._lock = threading.Lock()
        self._verifier = WebhookVerifier(config.signing_secret, clock=config.now)
        self._key: str | None = None
        self._version: int | None = None
        self._vault = hvac.Client(url=config.vault_addr, token=config.vault_token, timeout=5)
        self._http = httpx.Client(timeout=5.0)
        self._stop = threading.Event()
        self._probe_thread: threading.Thread | None = None
        self._ignore_updates = False

    # ------------------------------------------------------------------ key handling
    @property
    def fingerprint(self) -> str | None:
        with self._lock:
            return fingerprint(self._key) if self._key else None

    @property
    def version(self) -> int | None:
        return self._version

    def reload(self) -> str | None:
        """Read the newest version of the key from Vault; returns its fingerprint."""
        try:
            answer = self._vault.secrets.kv.v2.read_secret_version(
                path=self.config.path, mount_point=self.config.mount, raise_on_deleted_version=True)
        except Exception:
            with self._lock:
                self.stats.reload_errors += 1
            raise
        data = answer["data"]
        value = data["data"].get(self.config.field)
        if not isinstance(value, str) or not value:
            with self._lock:
                self.stats.reload_errors += 1
            raise LookupError(f"{self.config.mount}/{self.config.path} has no field {self.config.field!r}")
        with self._lock:
            self._key = value
            self._version = int(data["metadata"]["version"])
            self.stats.reloads += 1
        return fingerprint(value)

    def key_works(self) -> tuple[bool, int | None]:
        """Call the provider with the current key: (2xx?, status)."""
        with self._lock:
            key = self._key
        if key is None:
            return False, None
        try:
            response = self._http.get(self.config.check_url, headers={"Authorization": f"Bearer {key}"})
        except httpx.HTTPError:
            return False, None
        return 200 <= response.status_code < 300, response.status_code

    # ------------------------------------------------------------------ probe loop
    def ignore_updates(self, ignore: bool = True) -> None:
        """Simulate a broken application: webhooks are accepted but the key is not reloaded."""
        self._ignore_updates = ignore

    def start_probing(self) -> None:
        """Call the provider with the held key every ``probe_interval_ms`` (idempotent)."""
        interval = self.config.probe_interval_ms
        if not interval or (self._probe_thread is not None and self._probe_thread.is_alive()):
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(interval / 1000):
                if self._key is None:
                    continue  # an application with no key yet makes no calls
                ok, status = self.key_works()
                with self._lock:
                    self.stats.probes += 1
                    self.stats.last_probe_status = status
                    if not ok:
                        self.stats.probe_failures += 1
                        label = str(status) if status is not None else "error"
                        self.stats.failure_statuses[label] = self.stats.failure_statuses.get(label, 0) + 1

        self._probe_thread = threading.Thread(target=loop, name="consumer-probe", daemon=True)
        self._probe_thread.start()

    def stop_probing(self) -> None:
        self._stop.set()
        if self._probe_thread is not None:
            self._probe_thread.join(timeout=5)
            self._probe_thread = None

    def stop(self) -> None:
        self.stop_probing()
        self._http.close()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            stats = dict(vars(self.stats))
            stats["failure_statuses"] = dict(self.stats.failure_statuses)
            stats["events"] = list(self.stats.events)
            stats["failures"] = self.stats.probe_failures  # short alias used by the demo's checks
        stats["fingerprint"] = self.fingerprint
        stats["vault_version"] = self._version
        return stats

    # ------------------------------------------------------------------ HTTP
    def __call__(self, request: Request) -> Response:
        if request.path == WEBHOOK_PATH and request.method == "POST":
            return self._webhook(request)
        if request.path == "/health" and request.method == "GET":
            if self._key is None:
                try:
                    self.reload()
                except Exception:
                    pass
            ok, status = self.key_works()
            return Response.json(200, {"ok": ok, "fingerprint": self.fingerprint, "provider_status": status,
                                       "vault_version": self._version})
        if request.path == "/stats" and request.method == "GET":
            return Response.json(200, self.snapshot())
        return Response.json(404, {"error": f"no route {request.method} {request.path}"})

    def _webhook(self, request: Request) -> Response:
        try:
            self._verifier.verify(request.body, request.headers)
        except ReplayedDelivery:  # keyrotor re-sends a delivery whose answer it lost: done already
            return Response.json(200, {"fingerprint": self.fingerprint, "replayed": True})
        except SignatureError as exc:
            with self._lock:
                self.stats.webhooks_rejected += 1
            return Response.json(401, {"error": str(exc)})
        try:
            announcement = json.loads(request.body)
            vault_ref = announcement["vault"]
        except (ValueError, KeyError, TypeError):
            return Response.json(400, {"error": "body is not a keyrotor announcement"})
        if (vault_ref.get("mount"), vault_ref.get("path")) != (self.config.mount, self.config.path):
            with self._lock:
                self.stats.webhooks_ignored += 1
            return Response.json(200, {"ignored": True, "reason": "not the key this application uses"})
        if self._ignore_updates:
            with self._lock:
                self.stats.webhooks_ignored += 1
            return Response.json(200, {"fingerprint": self.fingerprint, "matches": False})
        try:
            held = self.reload()
        except Exception as exc:  # keyrotor retries a 503: that re-delivery must be accepted
            self._verifier.forget(request.headers)
            return Response.json(503, {"error": f"could not reload from Vault: {type(exc).__name__}"})
        with self._lock:
            self.stats.webhooks_accepted += 1
            self.stats.events.append(str(announcement.get("event")))
        return Response.json(200, {"fingerprint": held, "matches": held == announcement.get("fingerprint")})


class ConsumerHandle:
    def __init__(self, server: ServerHandle, consumer: Consumer) -> None:
        self._server = server
        self.consumer = consumer
        self.url = server.url
        self.webhook_url = server.url + WEBHOOK_PATH
        self.health_url = server.url + "/health"

    @property
    def fingerprint(self) -> str | None:
        return self.consumer.fingerprint

    def stats(self) -> dict[str, Any]:
        return self.consumer.snapshot()

    def reload(self) -> str | None:
        return self.consumer.reload()

    def start_probing(self) -> None:
        self.consumer.start_probing()

    def stop_probing(self) -> None:
        self.consumer.stop_probing()

    def ignore_updates(self, ignore: bool = True) -> None:
        self.consumer.ignore_updates(ignore)

    def stop(self) -> None:
        self.consumer.stop()
        self._server.stop()


def start_consumer_in_thread(*, vault_addr: str, vault_token: str, mount: str, path: str, field: str = "api_key",
                             signing_secret: str, provider_url: str | None = None, check_path: str = "/api/user/me",
                             probe_url: str | None = None, probe_interval_ms: int | None = None,
                             probe_interval: float | None = None, host: str = "127.0.0.1", port: int = 0,
                             now: Callable[[], float] = time.time, load_now: bool = True) -> ConsumerHandle:
    """Start the consumer. The provider check is ``provider_url + check_path`` or the full ``probe_url``;
    the probe period is ``probe_interval_ms`` or ``probe_interval`` (seconds). With ``load_now`` it
    reads its key from Vault first; a key that is not there yet is loaded later (``reload()`` or a webhook)."""
    if probe_url is None and provider_url is None:
        raise ValueError("give provider_url (with check_path) or probe_url")
    if probe_url is not None:
        provider_url, check_path = probe_url, ""
    interval_ms = probe_interval_ms if probe_interval_ms is not None else (
        int(probe_interval * 1000) if probe_interval else None)
    consumer = Consumer(ConsumerConfig(vault_addr, vault_token, mount, path, field, provider_url or "", signing_secret,
                                       check_path, interval_ms, now))
    if load_now:
        try:
            consumer.reload()
        except Exception:
            pass  # counted in reload_errors; /health and webhooks reload on demand
    server = serve_in_thread(consumer, host, port, name="sandbox-consumer")
    consumer.start_probing()
    return ConsumerHandle(server, consumer)


def run_consumer_forever(config: ConsumerConfig, *, host: str, port: int, ready: Callable[[str], None]) -> None:
    consumer = Consumer(config)
    try:
        consumer.reload()
    except Exception:
        pass  # the key may not exist yet; /health reloads on demand
    consumer.start_probing()
    try:
        serve_until_signalled(consumer, host, port, lambda handle: ready(handle.url))
    finally:
        consumer.stop()
