"""Notifications: signed webhooks, Slack payloads, bounded retries, no secrets, never raises."""

from __future__ import annotations

import hashlib
import hmac
import json

import httpx
import pytest
import structlog
import structlog.testing

from worker import notify as notify_mod
from worker.notify import Notifier, Sink, sign, sinks_from_specs
from worker.secret import Secret
from worker.secret_refs import make_resolver


class Recorder:
    def __init__(self, statuses: list[int] | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.statuses = list(statuses or [])

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        status = self.statuses.pop(0) if self.statuses else 200
        return httpx.Response(status, headers={"Retry-After": "0"} if status == 429 else {})


def notifier(sinks, recorder, attempts: int = 3) -> Notifier:  # type: ignore[no-untyped-def]
    return Notifier(sinks, http=httpx.Client(transport=httpx.MockTransport(recorder)), attempts=attempts,
                    base_delay=0.0, max_delay=0.0, sleep=lambda _s: None)


def test_webhook_is_signed_per_the_documented_scheme() -> None:
    rec = Recorder()
    key = Secret("whsec-signing-key-123")
    n = notifier([Sink("webhook", Secret("https://alerts.example/hook"), key)], rec)
    assert n.notify("failed", key_name="alloy/billing", run_id="r1", detail={"error": "PermanentError"}) == 1
    req = rec.requests[0]
    assert req.headers["X-Keyrotor-Event"] == "failed"
    t, v1 = (part.split("=", 1)[1] for part in req.headers["X-Keyrotor-Signature"].split(","))
    expected = hmac.new(b"whsec-signing-key-123", f"{t}.".encode() + req.content, hashlib.sha256).hexdigest()
    assert v1 == expected
    body = json.loads(req.content)
    assert body["event"] == "failed" and body["key"] == "alloy/billing" and body["run_id"] == "r1"


def test_slack_gets_a_text_message_without_secrets() -> None:
    rec = Recorder()
    n = notifier([Sink("slack", Secret("https://hooks.slack.example/T000/B000/XXXX"))], rec)
    n.notify("needs_attention", key_name="asana/automation", run_id="r2",
             detail={"state": "issued", "api_key": "sk-live-abcdef123456", "value": Secret("sk-live-zzz999999"),
                     "note": "Bearer abcdefghijklmnop"})
    body = json.loads(rec.requests[0].content)
    assert set(body) == {"text"}
    assert "asana/automation" in body["text"] and "NEEDS ATTENTION" in body["text"]
    for leaked in ("sk-live-abcdef123456", "sk-live-zzz999999", "abcdefghijklmnop"):
        assert leaked not in body["text"]


def test_retries_transient_failures_then_gives_up_without_raising(caplog) -> None:  # type: ignore[no-untyped-def]
    rec = Recorder([500, 429, 200])
    n = notifier([Sink("webhook", Secret("https://a.example/h"))], rec)
    assert n.notify("succeeded", key_name="k", run_id=None, detail={}) == 1
    assert len(rec.requests) == 3

    rec = Recorder([503, 503, 503, 503])
    n = notifier([Sink("webhook", Secret("https://a.example/h"))], rec, attempts=3)
    assert n.notify("succeeded", key_name="k", run_id=None, detail={}) == 0
    assert len(rec.requests) == 3  # bounded


def test_client_errors_are_not_retried_and_other_sinks_still_get_the_event() -> None:
    rec = Recorder([404, 200])
    n = notifier([Sink("webhook", Secret("https://a.example/gone")), Sink("slack", Secret("https://b.example/ok"))], rec)
    assert n.notify("rolled_back", key_name="k", run_id="r", detail={}) == 1
    assert [str(r.url) for r in rec.requests] == ["https://a.example/gone", "https://b.example/ok"]


def test_unreachable_sink_never_raises_and_url_is_not_logged(capsys) -> None:  # type: ignore[no-untyped-def]
    from worker.log import configure_logging

    configure_logging("INFO", "json")

    def boom(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused to https://hooks.slack.example/T/B/secretpath")

    n = Notifier([Sink("slack", Secret("https://hooks.slack.example/T/B/secretpath"))],
                 http=httpx.Client(transport=httpx.MockTransport(boom)), attempts=2, base_delay=0, max_delay=0,
                 sleep=lambda _s: None)
    assert n.notify("failed", key_name="k", run_id="r", detail={}) == 0
    out = capsys.readouterr().out
    assert "notification_failed" in out and "secretpath" not in out


def test_sinks_filter_events() -> None:
    rec = Recorder()
    n = notifier([Sink("slack", Secret("https://s.example/x"), events=frozenset({"reminder"}))], rec)
    assert n.notify("started", key_name="k", run_id="r", detail={}) == 0
    assert n.notify("reminder", key_name="k", run_id=None, detail={}) == 1
    assert n.notify("no-such-event", key_name="k", run_id=None, detail={}) == 0
    assert len(rec.requests) == 1


def test_sinks_from_inventory_specs_resolve_references() -> None:
    resolve = make_resolver(None, {"SLACK_URL": "https://hooks.slack.example/T/B/abc", "SIGN": "s3cr3t-signing"})
    sinks = sinks_from_specs(
        [
            {"kind": "slack", "url": {"env": "SLACK_URL"}, "events": ["failed"]},
            {"kind": "webhook", "url": "https://alerts.example/k", "signing_secret": {"env": "SIGN"}},
            {"kind": "slack", "url": {"env": "MISSING_VAR"}},  # unusable: skipped, not fatal
        ],
        resolve,
    )
    assert [s.kind for s in sinks] == ["slack", "webhook"]
    assert sinks[0].url.reveal().endswith("/abc") and sinks[0].events == frozenset({"failed"})
    assert sinks[1].signing_secret == Secret("s3cr3t-signing")


def test_notify_function_never_raises_into_its_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    """A notifier that cannot be built or cannot load its sinks is logged, never raised: the
    pipeline and the scheduler call this after their own work is done."""
    def unreadable(engine: object) -> list[dict[str, object]]:
        raise RuntimeError("database hiccup")

    monkeypatch.setattr(notify_mod, "snapshot_notifications", unreadable)
    bound = notify_mod.notify_function(object())
    # capture_logs, not a patched method on the module's logger: patching the lazy proxy leaves a
    # bound method cached on it, which later capture_logs blocks (other tests) no longer see.
    with structlog.testing.capture_logs() as logs:
        bound("started", key_name="k", run_id="r", detail={"reason": "expiry"})  # must not raise
    failures = [{k: v for k, v in e.items() if k != "log_level"} for e in logs if e["log_level"] == "error"]
    assert failures == [{"event": "notification_failed", "notify_event": "started", "key": "k", "run_id": "r",
                         "error": "RuntimeError"}]


def test_the_notification_settings_are_read_once_per_reload_interval_not_per_event(
        monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[int] = []
    declared: list[dict[str, object]] = []

    def settings(engine: object) -> list[dict[str, object]]:
        reads.append(1)
        return list(declared)

    clock = [1000.0]
    monkeypatch.setattr(notify_mod, "snapshot_notifications", settings)
    monkeypatch.setattr(notify_mod.time, "monotonic", lambda: clock[0])
    notifier_ = notify_mod.notifier_for(object())
    for _ in range(5):
        assert notifier_.notify("succeeded", key_name="k", run_id="r", detail={}) == 0
    assert len(reads) == 1
    # A `config apply` that adds a sink reaches the notifier once the interval is over.
    declared.append({"kind": "webhook", "url": "https://alerts.example/hook", "events": ["succeeded"],
                     "allow_insecure_http": False})
    clock[0] += notify_mod.SETTINGS_RELOAD_S - 0.1
    assert notifier_.sinks() == [] and len(reads) == 1
    clock[0] += 0.2
    assert [sink.kind for sink in notifier_.sinks()] == ["webhook"] and len(reads) == 2


def test_sign_format() -> None:
    assert sign(Secret("k"), b"{}", 10).startswith("t=10,v1=")


@pytest.mark.parametrize("event", sorted(notify_mod.EVENTS))
def test_every_event_has_a_slack_line(event: str) -> None:
    payload = notify_mod.build_payload(event, key_name="k", run_id=None, detail={})
    assert notify_mod.slack_text(payload).startswith("keyrotor: ")
