"""Owners' notices (assisted mode): contents, redaction, contact validation, and delivery over
real sockets to an SMTP stand-in and a Slack Web API stand-in."""

from __future__ import annotations

import socketserver
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from worker.inventory.loader import InventoryError, load_inventory
from worker.log import redact
from worker.notify import Notifier, Sink, build_payload
from worker.notice_text import deposit_detail, notice_text
from worker.owner_notices import owner_sink, smtp_sender
from worker.secret import Secret

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "keyrotor.example.yaml"


def _detail() -> dict[str, Any]:
    return deposit_detail(provider="asana", credential_type="personal_access_token", owner="ops", contact="slack #ops",
                          mount="secret", path="keyrotor/deposits/asana-automation", create_url="https://app.asana.example/0/my-apps",
                          run_id="r1", deadline_at="2026-12-09T00:00:00+00:00")


def test_a_credential_type_name_is_not_redacted_but_secrets_still_are() -> None:
    event = redact(None, "", {"credential_type": "personal_access_token", "target_credential_type": "pat",
                              "token": "abc", "detail": {"credential_type": "api_key", "api_key": "xyz"}})
    assert event["credential_type"] == "personal_access_token" and event["target_credential_type"] == "pat"
    assert event["token"] == "[REDACTED]" and event["detail"] == {"credential_type": "api_key", "api_key": "[REDACTED]"}


def test_the_notice_says_what_to_create_where_and_how_to_hand_it_over() -> None:
    payload = build_payload("deposit_requested", key_name="asana/automation", run_id="r1",
                            detail={**_detail(), "leak": Secret("pat-value-1234")})
    text = notice_text(payload)
    assert "key: asana/automation   provider: asana   credential type: personal_access_token" in text
    assert "create it at: https://app.asana.example/0/my-apps" in text
    assert ("hand it over: vault kv put -mount=secret keyrotor/deposits/asana-automation credential=- "
            "deposited_by=<your name>") in text
    assert "next step: create a new personal_access_token at asana (https://app.asana.example/0/my-apps)" in text
    assert "deadline: 2026-12-09" in text and "run: r1" in text
    assert "pat-value-1234" not in text and "pat-value-1234" not in str(payload) and "[REDACTED]" not in text


def test_a_contact_is_exactly_one_kind_and_slack_or_email_need_their_delivery(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    both = text.replace('contact: {slack: "#ops-automation"}', 'contact: {slack: "#ops-automation", email: a@b.example}')
    (tmp_path / "both.yaml").write_text(both)
    with pytest.raises(InventoryError) as exc:
        load_inventory(tmp_path / "both.yaml")
    line = [i + 1 for i, l in enumerate(both.splitlines()) if "contact: {slack" in l][0]
    assert f"both.yaml:{line}:" in str(exc.value) and "exactly one of slack, email, webhook" in str(exc.value)

    start = text.index("owner_delivery:")
    no_delivery = text[:start] + text[text.index("notifications:"):]
    (tmp_path / "nodelivery.yaml").write_text(no_delivery)
    with pytest.raises(InventoryError) as exc:
        load_inventory(tmp_path / "nodelivery.yaml")
    assert "keys.asana/automation.contact.slack" in str(exc.value) and "needs owner_delivery.slack" in str(exc.value)


class _SmtpSink(socketserver.StreamRequestHandler):
    """Just enough SMTP (RFC 5321) to accept one message: the test's stand-in mail server."""

    def handle(self) -> None:
        server: Any = self.server
        self.wfile.write(b"220 standin ESMTP\r\n")
        while True:
            line = self.rfile.readline()
            if not line:
                return
            verb = line.strip().split(b" ")[0].upper()
            if verb in (b"EHLO", b"HELO"):
                self.wfile.write(b"250 standin\r\n")
            elif verb in (b"MAIL", b"RCPT"):
                server.envelope.append(line.strip().decode())
                self.wfile.write(server.rcpt_answer if verb == b"RCPT" else b"250 ok\r\n")
            elif verb == b"DATA":
                self.wfile.write(b"354 go ahead\r\n")
                body = b""
                while not body.endswith(b"\r\n.\r\n"):
                    body += self.rfile.readline()
                server.messages.append(body.decode())
                self.wfile.write(b"250 queued\r\n")
            elif verb == b"QUIT":
                self.wfile.write(b"221 bye\r\n")
                return
            else:
                self.wfile.write(b"250 ok\r\n")


@pytest.fixture
def smtp_server() -> Iterator[Any]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _SmtpSink)
    server.daemon_threads = True
    server.messages, server.envelope, server.rcpt_answer = [], [], b"250 ok\r\n"  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _email_document(port: int) -> dict[str, Any]:
    return {"owner_delivery": {"email": {"smtp_host": "127.0.0.1", "smtp_port": port, "from": "keyrotor@example.com",
                                         "starttls": False}},
            "keys": {"asana/automation": {"contact": {"email": "ops@example.com"}}}}


def test_email_notices_go_over_smtp(smtp_server: Any) -> None:
    sink = owner_sink(_email_document(smtp_server.server_address[1]), "asana/automation", lambda ref: Secret("unused"))
    assert sink is not None and sink.kind == "email"
    delivered = Notifier([sink], attempts=1).notify("deposit_reminder", key_name="asana/automation", run_id="r1",
                                                    detail=_detail())
    assert delivered == 1
    assert [e.upper() for e in smtp_server.envelope] == ["MAIL FROM:<KEYROTOR@EXAMPLE.COM>", "RCPT TO:<OPS@EXAMPLE.COM>"]
    import email
    import email.policy

    message = email.message_from_string(smtp_server.messages[0][:-5], policy=email.policy.default)
    assert message["Subject"].startswith("keyrotor: asana/automation (asana personal_access_token): reminder")
    assert "vault kv put -mount=secret keyrotor/deposits/asana-automation credential=-" in message.get_content()


def test_a_refused_recipient_is_a_failed_notice_not_an_exception(smtp_server: Any) -> None:
    smtp_server.rcpt_answer = b"550 no such user\r\n"
    sink = owner_sink(_email_document(smtp_server.server_address[1]), "asana/automation", lambda ref: Secret("unused"))
    assert Notifier([sink], attempts=2, sleep=lambda s: None).notify(  # type: ignore[list-item]
        "deposit_reminder", key_name="asana/automation", run_id="r1", detail=_detail()) == 0
    assert smtp_server.messages == []


def test_an_unreachable_smtp_server_is_transient() -> None:
    from worker.errors import TransientError
    from worker.inventory.schema import EmailDeliverySpec

    spec = EmailDeliverySpec.model_validate({"smtp_host": "127.0.0.1", "smtp_port": 1, "from": "k@example.com",
                                             "starttls": False})
    with pytest.raises(TransientError):
        smtp_sender(spec, None, 2.0)("a@example.com", "s", "b")


def test_slack_notices_use_the_web_api_with_the_bot_token() -> None:
    from keyrotor_sandbox.standin_http import Response, serve_in_thread

    seen: list[Any] = []

    def app(request: Any) -> Any:
        seen.append((request.path, request.bearer(), request.json()))
        ok = request.json()["channel"] != "#gone"
        return Response.json(200, {"ok": ok} if ok else {"ok": False, "error": "channel_not_found"})

    server = serve_in_thread(app, name="slack-api")
    try:
        document = {"owner_delivery": {"slack": {"token": {"env": "X"}, "api_url": server.url + "/api"}},
                    "keys": {"k": {"contact": {"slack": "@alice"}}, "gone": {"contact": {"slack": "#gone"}}}}
        resolve = lambda ref: Secret("xoxb-bot-token")  # noqa: E731
        sink = owner_sink(document, "k", resolve)
        assert Notifier([sink], attempts=1).notify("deposit_requested", key_name="k", run_id="r1", detail=_detail()) == 1  # type: ignore[list-item]
        path, token, body = seen[0]
        assert path == "/api/chat.postMessage" and token == "xoxb-bot-token" and body["channel"] == "@alice"
        assert "credential type: personal_access_token" in body["text"]
        gone = owner_sink(document, "gone", resolve)
        assert Notifier([gone], attempts=1).notify("deposit_requested", key_name="gone", run_id="r1", detail=_detail()) == 0  # type: ignore[list-item]
    finally:
        server.stop()


def test_a_key_without_a_contact_has_no_owner_sink() -> None:
    assert owner_sink({"keys": {"k": {"owner": "x"}}}, "k", lambda ref: Secret("x")) is None
    assert isinstance(owner_sink({"keys": {"k": {"contact": {"webhook": {"url": "https://hooks.example/x"}}}}}, "k",
                                 lambda ref: Secret("x")), Sink)
