"""Notifications: rotation events and reminders to signed webhooks and Slack-compatible webhooks.

``notify(event, key_name=…, run_id=…, detail=…)`` never raises into its caller (the pipeline, the
scheduler): a delivery that fails after its bounded retries is logged and counted. Messages say
which key and run, never a secret: ``detail`` goes through the log redactor and ``Secret``
values are dropped. A Slack incoming-webhook URL is itself a credential, so sink URLs are kept
as ``Secret`` and logs name a sink only by its kind and index.

Sinks come from the inventory last applied to the caller's database (``inventory_snapshot``); a
caller that wants others (a test) builds its own ``Notifier`` or gives its ``PipelineContext`` a
``notify`` function: there is no process-wide notifier to install.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import httpx
from prometheus_client import Counter

from worker.clock import utcnow
from worker.errors import PermanentError, TransientError
from worker.http_security import insecure_http_problem, note_insecure_http
from worker.integrations import signing
from worker.log import get_logger, redact
from worker.notice_text import notice_subject, notice_text
from worker.retry import parse_retry_after, retry_call
from worker.secret import Secret
from worker.inventory.schema import NotificationSpec
from worker.inventory.snapshot import applied_settings
from worker.secret_refs import FieldReader, make_resolver
from worker.vault.store import VaultStore

log = get_logger(__name__)

EVENTS = frozenset({"started", "succeeded", "failed", "rolled_back", "needs_attention", "reminder"})
#: Notices to a key's owner in assisted mode (``worker/owner_notices.py``); shared sinks get them
#: only when they list them.
OWNER_EVENTS = frozenset({"deposit_requested", "deposit_reminder", "deposit_rejected", "deposit_accepted",
                          "revoke_requested", "needs_attention", "succeeded"})
ALL_EVENTS = EVENTS | OWNER_EVENTS
SIGNATURE_HEADER = "X-Keyrotor-Signature"
EVENT_HEADER = "X-Keyrotor-Event"

NOTIFICATIONS = Counter(
    "keyrotor_notifications_total",
    "Notification deliveries by event, sink kind and outcome (sent/failed).",
    ["event", "kind", "outcome"],
)

_SLACK_LINES = {
    "started": "rotation started",
    "succeeded": "rotation succeeded",
    "failed": "rotation FAILED (old key untouched)",
    "rolled_back": "rotation rolled back to the previous key",
    "needs_attention": "rotation NEEDS ATTENTION (old key untouched)",
    "reminder": "reminder: this key must be rotated by a person",
    "deposit_requested": "a new credential is needed from you",
    "deposit_reminder": "reminder: a new credential is still needed from you",
    "deposit_rejected": "the credential you deposited does NOT work; deposit another",
    "deposit_accepted": "thank you: the credential you deposited works and is being rolled out",
    "revoke_requested": "please revoke the old credential",
}


@dataclass(frozen=True)
class Sink:
    kind: str                       # "slack" | "webhook" | "slack_api" | "email" (the last two: owners)
    url: Secret                     # Slack webhook URLs are credentials: never logged
    signing_secret: Secret | None = None   # webhook: HMAC key; slack_api: the bot token
    events: frozenset[str] = EVENTS
    target: str | None = None       # slack_api: channel or user; email: the address
    send_mail: Callable[[str, str, str], None] | None = None   # email: (to, subject, body)
    allow_insecure_http: bool = False   # the inventory's allow_insecure_http for this sink

    def wants(self, event: str) -> bool:
        return event in self.events


def sign(secret: Secret, body: bytes, timestamp: int) -> str:
    """``t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`` — the integrations' webhook scheme."""
    return signing.sign(secret, body, timestamp=timestamp)


def _clean(detail: dict[str, Any]) -> dict[str, Any]:
    """Drop Secret values and credential-looking fields; make everything JSON-safe."""
    flat = {k: v for k, v in detail.items() if not isinstance(v, Secret)}
    cleaned = redact(None, "", flat)
    return json.loads(json.dumps(cleaned, default=str))


def build_payload(event: str, *, key_name: str, run_id: str | None, detail: dict[str, Any]) -> dict[str, Any]:
    return {"version": 1, "event": event, "key": key_name, "run_id": run_id, "at": utcnow().isoformat(), "detail": _clean(detail)}


def slack_text(payload: dict[str, Any]) -> str:
    line = _SLACK_LINES.get(payload["event"], payload["event"])
    parts = [f"keyrotor: {line}: key `{payload['key']}`"]
    if payload.get("run_id"):
        parts.append(f"run `{payload['run_id']}`")
    extras = ", ".join(f"{k}={v}" for k, v in sorted(payload["detail"].items()) if v not in (None, "", [], {}))
    return " ".join(parts) + (f" ({extras})" if extras else "")


class Notifier:
    """Delivers one event to every sink that wants it, each with bounded retries."""

    def __init__(
        self,
        sinks: Sequence[Sink] | Callable[[], Sequence[Sink]],
        *,
        http: httpx.Client | None = None,
        attempts: int = 3,
        timeout_s: float = 10.0,
        base_delay: float = 0.5,
        max_delay: float = 10.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._sinks = sinks
        self._http = http or httpx.Client(timeout=timeout_s, follow_redirects=False)
        self._attempts = attempts
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._sleep = sleep

    def sinks(self) -> Sequence[Sink]:
        return self._sinks() if callable(self._sinks) else self._sinks

    def notify(self, event: str, *, key_name: str, run_id: str | None, detail: dict[str, Any]) -> int:
        """Returns how many sinks accepted the event. Raises nothing a delivery can cause."""
        if event not in ALL_EVENTS:
            log.warning("notify_unknown_event", notify_event=event, known=sorted(ALL_EVENTS))
            return 0
        payload = build_payload(event, key_name=key_name, run_id=run_id, detail=detail)
        delivered = 0
        for index, sink in enumerate(self.sinks()):
            if not sink.wants(event):
                continue
            try:
                retry_call(lambda: self._deliver(sink, payload), attempts=self._attempts, base_delay=self._base_delay,
                           max_delay=self._max_delay, sleep=self._sleep)
            except Exception as exc:
                NOTIFICATIONS.labels(event, sink.kind, "failed").inc()
                log.error("notification_failed", notify_event=event, key=key_name, run_id=run_id, sink=f"{sink.kind}#{index}",
                          error=type(exc).__name__, detail=str(exc)[:200])
                continue
            NOTIFICATIONS.labels(event, sink.kind, "sent").inc()
            delivered += 1
        return delivered

    def _deliver(self, sink: Sink, payload: dict[str, Any]) -> None:
        if sink.kind == "email":
            assert sink.send_mail is not None and sink.target is not None
            sink.send_mail(sink.target, notice_subject(payload), notice_text(payload))
            return
        # A URL from a reference is only known here: the same rule as the inventory's literal URLs.
        problem = insecure_http_problem(sink.url.reveal(), sink.allow_insecure_http, "notifications")
        if problem is not None:
            raise PermanentError(f"{sink.kind} sink: {problem}")
        note_insecure_http("notification", sink.kind, [sink.url.reveal()])
        if sink.kind == "slack_api":
            self._post_slack_api(sink, payload)
            return
        if sink.kind == "slack":
            body = json.dumps({"text": slack_text(payload)}).encode()
            headers = {"Content-Type": "application/json"}
        else:
            body = json.dumps(payload, separators=(",", ":")).encode()
            headers = {"Content-Type": "application/json", EVENT_HEADER: payload["event"]}
            if sink.signing_secret is not None:
                headers[SIGNATURE_HEADER] = sign(sink.signing_secret, body, int(time.time()))
        try:
            response = self._http.post(sink.url.reveal(), content=body, headers=headers)
        except httpx.HTTPError as exc:  # the URL may hold a credential: never put it in the message
            raise TransientError(f"{sink.kind} sink unreachable: {type(exc).__name__}") from None
        if response.status_code == 429 or response.status_code >= 500:
            raise TransientError(f"{sink.kind} sink answered {response.status_code}",
                                 retry_after=parse_retry_after(response.headers.get("Retry-After")))
        if response.status_code >= 400:
            raise PermanentError(f"{sink.kind} sink refused the notification with {response.status_code}")


    def _post_slack_api(self, sink: Sink, payload: dict[str, Any]) -> None:
        """``chat.postMessage``: Slack answers 200 with ``{"ok": false, "error": …}`` on refusal."""
        assert sink.signing_secret is not None
        body = json.dumps({"channel": sink.target, "text": notice_text(payload)}).encode()
        headers = {"Content-Type": "application/json; charset=utf-8",
                   "Authorization": f"Bearer {sink.signing_secret.reveal()}"}
        try:
            response = self._http.post(sink.url.reveal().rstrip("/") + "/chat.postMessage", content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise TransientError(f"slack API unreachable: {type(exc).__name__}") from None
        if response.status_code == 429 or response.status_code >= 500:
            raise TransientError(f"slack API answered {response.status_code}",
                                 retry_after=parse_retry_after(response.headers.get("Retry-After")))
        try:
            answer = response.json()
        except ValueError:
            answer = {}
        if response.status_code >= 400 or not isinstance(answer, dict) or answer.get("ok") is not True:
            error = answer.get("error") if isinstance(answer, dict) else None
            raise PermanentError(f"slack API refused the message ({response.status_code}, {str(error)[:80]})")


# --------------------------------------------------------------------------- sinks from the inventory
def sinks_from_specs(specs: Iterable[Any], resolve: Callable[[Any], Secret]) -> list[Sink]:
    """``NotificationSpec``s (or their dicts) → sinks, resolving URL and signing-secret references."""
    sinks: list[Sink] = []
    for index, raw in enumerate(specs):
        try:
            spec = raw if isinstance(raw, NotificationSpec) else NotificationSpec.model_validate(raw)
            url = Secret(spec.url) if isinstance(spec.url, str) else resolve(spec.url)
            signing = resolve(spec.signing_secret) if spec.signing_secret is not None else None
        except Exception as exc:  # one bad sink must not silence the others
            log.error("notification_sink_unusable", sink=index, error=type(exc).__name__, detail=str(exc)[:200])
            continue
        sinks.append(Sink(kind=spec.kind, url=url, signing_secret=signing, events=frozenset(spec.events),
                          allow_insecure_http=spec.allow_insecure_http))
    return sinks


def snapshot_notifications(engine: Any) -> list[dict[str, Any]]:
    """The ``notifications`` section of the last applied inventory, or [] if none was applied."""
    return list(applied_settings(engine).get("notifications") or [])


#: How long a notifier uses the notification settings it read before reading them again.
SETTINGS_RELOAD_S = 10.0


def notifier_for(engine: Any, settings: Any = None, *, vault: FieldReader | None = None) -> Notifier:
    """A notifier whose sinks come from the inventory applied to *this* database (``engine``), with
    secret references resolved through ``vault`` (else one built from ``settings`` when it names a
    Vault; else only ``env:`` references resolve). Nothing here reads the process's default
    settings: a context built for another database notifies that database's sinks. The settings
    are read again at most every ``SETTINGS_RELOAD_S``; references are resolved at each event."""
    state: dict[str, Any] = {"vault": vault, "specs": None, "read_at": 0.0}
    lock = threading.Lock()

    def specs() -> list[dict[str, Any]]:
        # Read again at most every SETTINGS_RELOAD_S: not one query per event (every rotation
        # notifies), and a `config apply` reaches running workers' notifications within that.
        with lock:
            if state["specs"] is None or time.monotonic() - state["read_at"] >= SETTINGS_RELOAD_S:
                state["specs"], state["read_at"] = snapshot_notifications(engine), time.monotonic()
            return list(state["specs"])

    def load() -> list[Sink]:
        declared = specs()
        if not declared:
            return []
        if state["vault"] is None and settings is not None and getattr(settings, "vault_addr", None):
            state["vault"] = VaultStore.from_settings(settings)
        return sinks_from_specs(declared, make_resolver(state["vault"]))

    options: dict[str, Any] = {}
    if settings is not None:
        options = {"attempts": settings.notify_attempts, "timeout_s": settings.notify_timeout_s}
    return Notifier(load, **options)


NotifyFunction = Callable[..., None]


def notify_function(engine: Any, settings: Any = None, *, vault: FieldReader | None = None) -> NotifyFunction:
    """``notify(event, *, key_name, run_id, detail)`` bound to ``engine`` (see ``notifier_for``),
    for ``PipelineContext.notify`` and the scheduler's jobs. Never raises."""
    built: list[Notifier] = []
    build_lock = threading.Lock()

    def bound(event: str, *, key_name: str, run_id: str | None, detail: dict[str, Any] | None = None) -> None:
        try:
            with build_lock:
                if not built:
                    built.append(notifier_for(engine, settings, vault=vault))
            built[0].notify(event, key_name=key_name, run_id=run_id, detail=detail or {})
        except Exception as exc:
            log.error("notification_failed", notify_event=event, key=key_name, run_id=run_id, error=type(exc).__name__)

    return bound
