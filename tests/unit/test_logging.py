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


def test_a_keys_remembered_verdict_never_spares_a_later_value(stream: io.StringIO) -> None:
    # Verdicts are remembered per key name, values are looked at on every line, whatever their type.
    logger = klog.get_logger("keyrotor.test")
    logger.info("first", note="plain text", api_key="k-0001", count=3, items=["a"])
    logger.info("second", note="sent Bearer sk_live_abcdefghijkl", api_key="k-0002", count=None,
                items=["Bearer sk_live_mnopqrstuvwx", Secret("in-a-list-0123456789")], nested={"password": "pw-0003"})
    text = stream.getvalue()
    for leaked in ("k-0001", "k-0002", "sk_live_abcdefghijkl", "sk_live_mnopqrstuvwx", "in-a-list-0123456789", "pw-0003"):
        assert leaked not in text
    first, second = lines(stream)
    assert first["note"] == "plain text" and first["count"] == 3 and first["items"] == ["a"]
    assert second["count"] is None and second["nested"] == {"password": klog.REDACTED}


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


def test_secrets_coming_and_going_on_many_threads_never_break_logging() -> None:
    """Steps register and forget live secrets on their threads while others log: no line may raise
    (a "Set changed size during iteration" once failed a rotation inside stage_pending)."""
    import sys
    import threading

    buf = io.StringIO()
    klog.configure_logging("INFO", "json", stream=buf)
    logger = klog.get_logger("keyrotor.test.race")
    stop = threading.Event()
    errors: list[BaseException] = []
    base = [f"live-secret-{i:04d}-abcdefgh" for i in range(100)]

    def churn(offset: int) -> None:
        i = 0
        while not stop.is_set():  # a step holds a few values for a while, then forgets them
            values = [f"churn-{offset}-{i}-{k}-abcdefgh" for k in range(5)]
            for value in values:
                klog.register_secret(value)
            for value in values:
                klog.forget_secret(value)
            i += 1

    def write(n: int) -> None:
        try:
            for i in range(300):
                logger.info("step.progress", a=f"value {i} live-secret-0001-abcdefgh", b="x" * 2000, c="y", n=n)
        except BaseException as exc:  # noqa: BLE001 - any exception out of logging is the failure
            errors.append(exc)

    for value in base:
        klog.register_secret(value)
    churners = [threading.Thread(target=churn, args=(k,)) for k in range(4)]
    writers = [threading.Thread(target=write, args=(k,)) for k in range(8)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, as a busy worker does
    try:
        for t in churners + writers:
            t.start()
        for t in writers:
            t.join()
    finally:
        sys.setswitchinterval(interval)
        stop.set()
        for t in churners:
            t.join()
        for value in base:
            klog.forget_secret(value)
    assert errors == []
    assert "live-secret-0001-abcdefgh" not in buf.getvalue()
    assert len(lines(buf)) == 8 * 300


def test_the_same_secret_held_twice_stays_scrubbed_until_both_forget_it(stream: io.StringIO) -> None:
    klog.register_secret("shared-value-0123456789")
    klog.register_secret("shared-value-0123456789")
    klog.forget_secret("shared-value-0123456789")
    try:
        klog.get_logger().info("oops", note="shared-value-0123456789")
    finally:
        klog.forget_secret("shared-value-0123456789")
    assert "shared-value-0123456789" not in stream.getvalue()


class _Hostile(str):
    """A value whose substring test fails (stands for any processor failure)."""

    def __contains__(self, item: object) -> bool:
        raise RuntimeError("boom")


def test_a_failing_processor_never_raises_into_the_caller_nor_leaks(stream: io.StringIO) -> None:
    klog.register_secret("registered-secret-value")
    try:
        klog.get_logger("keyrotor.test").info("stage.written", odd=_Hostile("x"), note="registered-secret-value")
    finally:
        klog.forget_secret("registered-secret-value")
    assert "registered-secret-value" not in stream.getvalue()
    (entry,) = lines(stream)
    assert entry["event"] == "stage.written" and "scrub_known_secrets raised RuntimeError" in entry["log_error"]
    assert entry["level"] == "info" and entry["logger"] == "keyrotor.test"


# keyrotor's own lines are rendered by structlog and handed to the handlers as text (no LogRecord,
# no formatter); what the standard library would decide about a record still holds for them.

class _Collect(logging.Handler):
    def __init__(self, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_another_handler_gets_the_rendered_line_as_a_record(stream: io.StringIO) -> None:
    collect = _Collect()
    logging.getLogger().addHandler(collect)
    try:
        klog.get_logger("keyrotor.test").warning("lease.lost", run_id="r-9")
    finally:
        logging.getLogger().removeHandler(collect)
    (record,) = collect.records
    assert record.name == "keyrotor.test" and record.levelno == logging.WARNING
    assert json.loads(record.getMessage()) == lines(stream)[0]
    assert lines(stream)[0]["event"] == "lease.lost"


def test_handler_levels_propagation_and_disabled_loggers_are_honoured(stream: io.StringIO) -> None:
    loud, own = _Collect(logging.ERROR), _Collect()
    logging.getLogger().addHandler(loud)
    quiet = logging.getLogger("keyrotor.quiet")
    quiet.addHandler(own)
    try:
        klog.get_logger("keyrotor.test").info("below.the.handler.level")
        assert loud.records == [] and len(lines(stream)) == 1
        klog.get_logger("keyrotor.test").error("at.the.handler.level")
        assert [json.loads(r.getMessage())["event"] for r in loud.records] == ["at.the.handler.level"]
        quiet.propagate = False
        klog.get_logger("keyrotor.quiet").info("stays.here")
        assert [json.loads(r.getMessage())["event"] for r in own.records] == ["stays.here"]
        assert len(lines(stream)) == 2  # it did not reach the root's handler
        quiet.disabled = True
        klog.get_logger("keyrotor.quiet").error("nowhere")
        assert len(own.records) == 1
        quiet.disabled = False
        logging.disable(logging.ERROR)
        klog.get_logger("keyrotor.quiet").error("disabled.everywhere")
        assert len(own.records) == 1
    finally:
        logging.disable(logging.NOTSET)
        logging.getLogger().removeHandler(loud)
        quiet.removeHandler(own)
        quiet.propagate, quiet.disabled = True, False


def test_a_renderer_that_fails_leaves_a_minimal_line(stream: io.StringIO) -> None:
    class Unprintable:
        def __repr__(self) -> str:
            raise RuntimeError("no")

    klog.get_logger("keyrotor.test").info("odd.value", value=Unprintable())
    (entry,) = lines(stream)
    assert entry["event"] == "odd.value" and "raised RuntimeError" in entry["log_error"]
    assert entry["level"] == "info" and entry["logger"] == "keyrotor.test"


def test_a_failing_write_never_reaches_the_caller(capfd) -> None:  # type: ignore[no-untyped-def]
    class Broken(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError("disk full")

    klog.configure_logging("INFO", "json", stream=Broken())
    try:
        klog.get_logger("keyrotor.test").info("unwritable")  # must not raise
    finally:
        klog.configure_logging("INFO", "json", stream=io.StringIO())
    assert "OSError" in capfd.readouterr().err  # logging's own report of a handler error
