"""The versioned rotation-request message any producer can enqueue: parsing, validation, acting on it
(the actor consuming it is ``worker.runtime.actors.rotation_requests``).

Schema (version 1; see docs/queue-message.md)::

    {"version": 1, "key": "alloy/reporting", "reason": "manual", "requested_by": "ci:deploy-42",
     "idempotency_key": "deploy-42", "not_before": null, "emergency": false}

or, for an emergency on every key of a provider::

    {"version": 1, "provider": "alloy", "all": true, "emergency": true, "reason": "breach", ...}

A malformed message is rejected with a logged reason, an audit event (``queue_message_rejected``)
and a counter; it is never retried and never stops a worker. The same idempotency key gives the
same run; a request for a key with an open run joins it.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any, Callable, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from worker import log
from worker.clock import utcnow
from worker.db.models import AuditEvent, RotationRun
from worker.db.session import session_scope
from worker.errors import KeyrotorError
from worker.inventory.literals import looks_like_credential
from worker.metrics import QUEUE_MESSAGES_REJECTED
from worker.pipeline.outbox import enqueue_run
from worker.pipeline.requests import request_rotation
from worker.service.emergency import request_provider_rotation

logger = log.get_logger("keyrotor.pipeline.messages")

SCHEMA_VERSION = 1
_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,39}")
MAX_MESSAGE_BYTES = 16_384


class MalformedMessage(KeyrotorError):
    """The message does not match the schema; ``reason`` says what is wrong (never its content)."""

    def __init__(self, reason: str, code: str = "malformed") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class RotationRequestV1(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1]
    key: Optional[str] = Field(None, min_length=1, max_length=200)
    provider: Optional[str] = Field(None, min_length=1, max_length=128)
    all: bool = False
    reason: str = Field("manual", min_length=1, max_length=64)
    requested_by: str = Field(min_length=1, max_length=200)
    idempotency_key: Optional[str] = Field(None, min_length=1, max_length=200)
    not_before: Optional[datetime] = None
    emergency: bool = False
    target_credential_type: Optional[str] = Field(None, min_length=1, max_length=64)

    @field_validator("not_before")
    @classmethod
    def _aware(cls, value: Optional[datetime]) -> Optional[datetime]:
        if value is not None and value.tzinfo is None:
            raise ValueError("not_before needs a timezone, e.g. 2026-01-01T00:00:00Z")
        return value

    @model_validator(mode="after")
    def _target(self) -> "RotationRequestV1":
        if self.key and (self.provider or self.all):
            raise ValueError("give either 'key', or 'provider' with 'all': true, not both")
        if not self.key:
            if not (self.provider and self.all):
                raise ValueError("give 'key', or 'provider' with 'all': true")
            if not self.emergency:
                raise ValueError("'provider' + 'all' rotates every key with no grace period; it needs 'emergency': true")
        return self


def parse_request(raw: Any) -> RotationRequestV1:
    """Validate a message (a dict, or a JSON string/bytes); raise ``MalformedMessage`` with a reason."""
    if isinstance(raw, (bytes, bytearray)):
        if len(raw) > MAX_MESSAGE_BYTES:
            raise MalformedMessage(f"message is larger than {MAX_MESSAGE_BYTES} bytes", "too_large")
        raw = raw.decode("utf-8", errors="replace")
    if isinstance(raw, str):
        if len(raw) > MAX_MESSAGE_BYTES:
            raise MalformedMessage(f"message is larger than {MAX_MESSAGE_BYTES} bytes", "too_large")
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise MalformedMessage(f"not JSON: {exc.msg} at position {exc.pos}", "not_json") from None
    if not isinstance(raw, dict):
        raise MalformedMessage(f"expected a JSON object, got {type(raw).__name__}", "not_object")
    version = raw.get("version")
    if version != SCHEMA_VERSION:
        # The value is shown only when it is a plain number: a string there could be anything.
        shown = repr(version) if isinstance(version, int) and not isinstance(version, bool) and abs(version) < 10**6 \
            else ("missing" if version is None else f"a {type(version).__name__}")
        raise MalformedMessage(f"unsupported version ({shown}); this worker reads version {SCHEMA_VERSION}", "bad_version")
    try:
        return RotationRequestV1.model_validate(raw)
    except ValidationError as exc:
        # Only field paths and messages: the input values could hold anything (even a secret).
        problems = "; ".join(
            f"{'.'.join(_field_name(p) for p in err['loc']) or 'message'}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors(include_input=False, include_url=False)
        )
        raise MalformedMessage(problems, "invalid") from None


def _field_name(part: Any) -> str:
    """A location part as shown in a rejection: the schema's own names as they are; an unknown
    field's name only when it looks like a name (a credential sent as a key is not echoed)."""
    name = str(part)
    if name in RotationRequestV1.model_fields or (_PLAIN_NAME.fullmatch(name) and not looks_like_credential(name)):
        return name
    return "<unknown field, name not shown>"


def handle_request(engine: Any, request: RotationRequestV1) -> list[tuple[RotationRun, bool]]:
    """Create (or join) the run(s) a valid request asks for; commits."""
    with session_scope(engine) as session:
        if request.key:
            run, created = request_rotation(
                session, key_name=request.key, reason=request.reason, trigger="queue",
                requested_by=request.requested_by, idempotency_key=request.idempotency_key,
                not_before=request.not_before, emergency=request.emergency,
                target_credential_type=request.target_credential_type)
            return [(run, created)]
        # The message's idempotency key is the batch id: a redelivered (or re-sent) emergency
        # joins the runs it created the first time instead of starting a second emergency.
        return request_provider_rotation(session, provider=request.provider or "", requested_by=request.requested_by,
                                         reason=request.reason, batch_id=request.idempotency_key)


def reject(engine: Any, reason: str, code: str, message_id: Optional[str] = None) -> None:
    """Log, count and audit a rejected message (never its content)."""
    QUEUE_MESSAGES_REJECTED.labels(reason=code).inc()
    logger.error("queue_message.rejected", reason=reason, code=code, message_id=message_id)
    try:
        with session_scope(engine) as session:
            session.add(AuditEvent(at=utcnow(), actor="queue", event="queue_message_rejected",
                                   detail={"reason": reason, "code": code, "message_id": message_id}))
    except Exception as exc:  # the audit is best effort here; the worker must keep going
        logger.error("queue_message.audit_failed", error=type(exc).__name__)


def consume(raw: Any, *, engine: Any, message_id: Optional[str] = None, default_idempotency_key: Optional[str] = None,
            on_reject: Optional[Callable[[str, str], None]] = None) -> list[tuple[RotationRun, bool]]:
    """Validate and act on one message; malformed or unknown → rejected (returns []).

    ``default_idempotency_key``: used when the request has none, so a redelivered message (the
    stream's entry id) maps to the run its first delivery created. ``on_reject(reason, code)`` is
    told about a rejection (the stream consumer dead-letters it)."""
    try:
        request = parse_request(raw)
    except MalformedMessage as exc:
        reject(engine, exc.reason, exc.code, message_id)
        if on_reject is not None:
            on_reject(exc.reason, exc.code)
        return []
    if request.idempotency_key is None and default_idempotency_key is not None:
        request = request.model_copy(update={"idempotency_key": default_idempotency_key})
    try:
        results = handle_request(engine, request)
    except KeyrotorError as exc:  # unknown/disabled key, reused idempotency key: permanent
        reject(engine, str(exc), "refused", message_id)
        if on_reject is not None:
            on_reject(str(exc), "refused")
        return []
    for run, created in results:
        if created:
            enqueue_run(run)
        logger.info("queue_message.accepted", run_id=run.id, joined=not created, requested_by=request.requested_by)
    return results
