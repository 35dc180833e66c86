"""Notices to a key's owner (assisted mode): what to create, where, and how to hand it over.

The owner's contact is the key's ``contact`` in the applied inventory (a Slack channel or user
through the Slack Web API, an email address through SMTP, or a signed webhook); delivery settings
are the inventory's ``owner_delivery`` section. Notices go through ``worker.notify.Notifier`` (the
same bounded retries, never raises). A key without a contact falls back to the shared sinks.

A notice carries the key, provider, credential type, the exact next step and where to do it —
never a secret (``detail`` goes through the log redactor like every notification).
"""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage
from typing import Any, Callable, Optional

from worker.errors import PermanentError, TransientError
from worker.log import get_logger
from worker.notify import ALL_EVENTS, Notifier, Sink, notify_function
from worker.secret import Secret
from worker.inventory.schema import ContactSpec, OwnerDeliverySpec
from worker.inventory.snapshot import document_for
from worker.secret_refs import FieldReader, make_resolver

log = get_logger(__name__)

def smtp_sender(spec: Any, password: Optional[Secret], timeout_s: float) -> Callable[[str, str, str], None]:
    """``send(to, subject, body)`` over SMTP (STARTTLS, login when configured). A 4xx answer or a
    connection error is transient; a 5xx answer is permanent."""

    def send(to: str, subject: str, body: str) -> None:
        message = EmailMessage()
        message["From"], message["To"], message["Subject"] = spec.sender, to, subject
        message.set_content(body)
        try:
            with smtplib.SMTP(spec.smtp_host, spec.smtp_port, timeout=timeout_s) as smtp:
                if spec.starttls:
                    smtp.starttls(context=ssl.create_default_context())
                if spec.username:
                    smtp.login(spec.username, password.reveal() if password is not None else "")
                smtp.send_message(message)
        except smtplib.SMTPResponseException as exc:
            error = TransientError if 400 <= exc.smtp_code < 500 else PermanentError
            raise error(f"SMTP server answered {exc.smtp_code}") from None
        except smtplib.SMTPRecipientsRefused:
            raise PermanentError("SMTP server refused the recipient") from None
        except (OSError, smtplib.SMTPException) as exc:
            raise TransientError(f"SMTP server unreachable: {type(exc).__name__}") from None

    return send


def owner_sink(document: dict[str, Any], key_name: str, resolve: Callable[[Any], Secret]) -> Optional[Sink]:
    """The sink for ``key_name``'s contact in an applied inventory document, or ``None``."""
    raw = ((document.get("keys") or {}).get(key_name) or {}).get("contact")
    if not raw:
        return None
    contact = ContactSpec.model_validate(raw)
    delivery = OwnerDeliverySpec.model_validate(document.get("owner_delivery") or {})
    events = frozenset(ALL_EVENTS)
    if contact.webhook is not None:
        url = Secret(contact.webhook.url) if isinstance(contact.webhook.url, str) else resolve(contact.webhook.url)
        signing = resolve(contact.webhook.signing_secret) if contact.webhook.signing_secret is not None else None
        return Sink(kind="webhook", url=url, signing_secret=signing, events=events)
    if contact.slack is not None:
        if delivery.slack is None:
            raise PermanentError("a slack contact needs owner_delivery.slack")
        return Sink(kind="slack_api", url=Secret(delivery.slack.api_url), signing_secret=resolve(delivery.slack.token),
                    events=events, target=contact.slack)
    if delivery.email is None:
        raise PermanentError("an email contact needs owner_delivery.email")
    password = resolve(delivery.email.password) if delivery.email.password is not None else None
    return Sink(kind="email", url=Secret("smtp"), events=events, target=contact.email,
                send_mail=smtp_sender(delivery.email, password, delivery.email.timeout.total_seconds()))


def contact_of(document: dict[str, Any], key_name: str) -> Optional[str]:
    """How the key's contact is shown in notices and the audit trail (no webhook URL)."""
    raw = ((document.get("keys") or {}).get(key_name) or {}).get("contact")
    return ContactSpec.model_validate(raw).describe() if raw else None


def notify_owner(engine: Any, event: str, *, key_name: str, run_id: Optional[str], detail: dict[str, Any],
                 vault: FieldReader | None = None, settings: Any = None) -> bool:
    """Send ``event`` to the key's owner; without a contact, to the shared sinks (as ``reminder``,
    or ``needs_attention``). True when the owner's contact accepted it. Never raises."""
    try:
        document = document_for(engine, [key_name])
        sink = owner_sink(document, key_name, make_resolver(vault))
        if sink is not None:
            options: dict[str, Any] = {}
            if settings is not None:
                options = {"attempts": settings.notify_attempts, "timeout_s": settings.notify_timeout_s}
            return Notifier([sink], **options).notify(event, key_name=key_name, run_id=run_id, detail=detail) == 1
        log.warning("owner_contact_missing", key=key_name, notify_event=event,
                    detail="no contact declared for the key; the shared sinks get the notice")
    except Exception as exc:
        log.error("owner_notice_failed", key=key_name, notify_event=event, error=type(exc).__name__,
                  detail=str(exc)[:200])
    shared = "needs_attention" if event == "needs_attention" else "reminder"
    notify_function(engine, settings, vault=vault)(shared, key_name=key_name, run_id=run_id,
                                                  detail={**detail, "owner_event": event})
    return False
