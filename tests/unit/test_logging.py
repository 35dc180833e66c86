"""Logging: JSON lines, UTC ISO timestamps, bound context, stdlib loggers, redaction."""

from __future__ import annotations

import io
import json
import logging

import pytest

from worker import log as klog
from worker.secret import Secret


@pytest.fixture
def stream() -> io.StringIO:
    buf = io.StringIO()
    klog.configure_logging("DEBUG", "json", stream=buf)
    yield buf
    klog.clear()


def lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def test_json_lines_with_utc_timestamp_and_context(stream: io.StringIO) -> None:
    klog.bind(run_id="r-1", key="alloy/reporting", step="issue")
    klog.get_logger("keyrotor.test").info("step_started", attempt=1)
    (entry,) = lines(stream)
    assert entry["event"] == "step_started"
    assert entry["run_id"] == "r-1" and entry["key"] == "alloy/reporting" and entry["step"] == "issue"
    assert entry["timestamp"].endswith("Z")
    assert entry["level"] == "info"


@pytest.mark.parametrize("name", ["dramatiq.worker", "apscheduler.scheduler", "hvac.adapters", "sqlalchemy.pool"])
def test_third_party_loggers_render_as_json(stream: io.StringIO, name: str) -> None:
    klog.bind(run_id="r-2")
    logging.getLogger(name).warning("something %s", "happened")
    (entry,) = lines(stream)
    assert entry["event"] == "something happened" and entry["logger"] == name and entry["run_id"] == "r-2"


def test_redaction_of_keys_values_and_secret_objects(stream: io.StringIO) -> None:
    secret = Secret("alloy_live_0123456789abcdef")
    klog.get_logger().info(
        "call",
        api_key="abc123",
        headers={"Authorization": "Bearer xyz.abc.def123456", "Accept": "json"},
        value=secret,
        note="sent Bearer sk_live_abcdefghijkl to provider",
        fingerprint=secret.fingerprint,
    )
    text = stream.getvalue()
    assert "abc123" not in text and "xyz.abc.def123456" not in text
    assert "alloy_live_0123456789abcdef" not in text and "sk_live_abcdefghijkl" not in text
    (entry,) = lines(stream)
    assert entry["fingerprint"] == secret.fingerprint  # fingerprints are safe and useful
    assert entry["headers"]["Accept"] == "json"


def test_registered_secret_is_scrubbed_anywhere(stream: io.StringIO) -> None:
    klog.register_secret("plain-looking-value-42")
    try:
        klog.get_logger().info("oops", message="value was plain-looking-value-42 here")
    finally:
        klog.forget_secret("plain-looking-value-42")
    assert "plain-looking-value-42" not in stream.getvalue()


def test_tracebacks_carry_no_local_variables(stream: io.StringIO) -> None:
    def failing() -> None:
        hidden_local = "local-secret-value-xyz"  # noqa: F841
        raise RuntimeError("boom")

    try:
        failing()
    except RuntimeError:
        klog.get_logger().exception("failed")
    text = stream.getvalue()
    assert "local-secret-value-xyz" not in text
    (entry,) = lines(stream)
    frames = entry["exception"][0]["frames"]
    assert frames and all("locals" not in frame for frame in frames)


def test_secret_wrapper_never_shows_value() -> None:
    secret = Secret("s3cr3t-value-for-repr")
    assert "s3cr3t" not in repr(secret) and "s3cr3t" not in str(secret) and "s3cr3t" not in f"{secret}"
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(secret)
