"""One line, never a traceback: busy ports, unknown revisions, oversize arguments; distinct metrics
ports; the worker's start line; the scheduler's lock tick quiet below DEBUG."""

from __future__ import annotations

import io
import json
import logging
import socket

import pytest

from worker.cli.main import main
from worker.settings import get_settings, load_settings


@pytest.fixture(autouse=True)
def _fresh_settings():  # type: ignore[no-untyped-def]
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture
def busy_port():  # type: ignore[no-untyped-def]
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_worker_and_scheduler_default_to_different_metrics_ports(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("KEYROTOR_METRICS_PORT", raising=False)
    settings = load_settings()
    assert settings.metrics_port_for("worker") == 9108 and settings.metrics_port_for("scheduler") == 9109
    monkeypatch.setenv("KEYROTOR_METRICS_PORT", "9200")
    settings = load_settings()
    assert settings.metrics_port_for("worker") == settings.metrics_port_for("scheduler") == 9200


@pytest.mark.parametrize("role", ["worker", "scheduler"])
def test_a_busy_metrics_port_is_one_line_naming_the_setting(role, busy_port, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from worker.cli.common import serve_metrics

    monkeypatch.setenv("KEYROTOR_METRICS_PORT", str(busy_port))
    import typer

    with pytest.raises(typer.Exit) as exc:
        serve_metrics(load_settings(), role)
    assert exc.value.exit_code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"port {busy_port} is already in use" in line and "KEYROTOR_METRICS_PORT" in line


def test_a_busy_stand_in_port_is_one_line(busy_port, capsys) -> None:  # type: ignore[no-untyped-def]
    code = main(["sandbox", "provider", "--port", str(busy_port), "--host", "0.0.0.0", "--admin-token", "t"])
    assert code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"port {busy_port} is already in use" in line and "--port" in line


def test_db_upgrade_to_an_unknown_revision_is_one_line(tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("KEYROTOR_DATABASE_URL", f"sqlite:///{tmp_path}/k.db")
    assert main(["db", "upgrade", "nosuchrev"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "unknown revision 'nosuchrev'" in line and "head" in line


@pytest.mark.parametrize("days", ["1e9", "inf"])
def test_plan_days_far_ahead_is_one_line(days, tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("KEYROTOR_DATABASE_URL", f"sqlite:///{tmp_path}/k.db")
    assert main(["plan", "--days", days]) == 2
    assert "--days" in _one_error_line(capsys.readouterr().err)


def test_rotate_refuses_a_reason_longer_than_the_column_before_recording(tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("KEYROTOR_DATABASE_URL", f"sqlite:///{tmp_path}/k.db")
    assert main(["rotate", "alloy/x", "--reason", "r" * 65]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--reason is 65 characters; at most 64" in line
    assert not (tmp_path / "k.db").exists()  # refused before touching anything


def test_worker_start_line_names_where_it_reads_and_writes(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from worker.cli import worker_cmd
    from worker.runtime import workers

    monkeypatch.setenv("KEYROTOR_DATABASE_URL", "postgresql://keyrotor:dbpass123@db.internal:5432/keyrotor")
    monkeypatch.setenv("KEYROTOR_REDIS_URL", "redis://:redispass456@redis.internal:6379/0")
    monkeypatch.setenv("KEYROTOR_QUEUE_NAMESPACE", "team-a")
    monkeypatch.setenv("VAULT_ADDR", "https://vault.internal:8200")
    monkeypatch.setenv("VAULT_TOKEN", "s.token")
    monkeypatch.setenv("KEYROTOR_METRICS_PORT", "0")
    monkeypatch.setattr(worker_cmd, "open_database", lambda settings: None)
    monkeypatch.setattr(worker_cmd, "require_redis", lambda url: None)
    monkeypatch.setattr("worker.doctor.log_unresolvable_references", lambda engine, settings: None)
    monkeypatch.setattr(workers, "run_worker", lambda **kwargs: 0)
    from worker import metrics

    try:
        assert main(["worker"]) == 0
    finally:
        metrics.set_health_check(None)
    out = capsys.readouterr().out
    start = next(json.loads(line) for line in out.splitlines() if '"worker_started"' in line)
    assert start["database"].endswith("://keyrotor:***@db.internal:5432/keyrotor")
    assert start["redis"] == "redis://:***@redis.internal:6379/0"
    assert start["namespace"] == "team-a" and start["vault"] == "https://vault.internal:8200"
    assert start["queues"] == ["rotation", "rotation_requests"]
    assert "dbpass123" not in out and "redispass456" not in out


@pytest.mark.parametrize("level,shown", [("INFO", False), ("DEBUG", True)])
def test_apscheduler_job_lines_only_at_debug(level, shown) -> None:  # type: ignore[no-untyped-def]
    from worker.log import configure_logging

    buf = io.StringIO()
    configure_logging(level, "json", stream=buf)
    try:
        logging.getLogger("apscheduler.executors.default").info('Running job "leader-lock" (trigger: interval)')
        logging.getLogger("apscheduler.executors.default").info('Job "leader-lock" executed successfully')
        logging.getLogger("apscheduler.executors.default").warning("Run time of job was missed")
    finally:
        configure_logging("INFO", "json")
    events = [json.loads(line)["event"] for line in buf.getvalue().splitlines()]
    assert ("Job \"leader-lock\" executed successfully" in events) is shown
    assert "Run time of job was missed" in events


def test_config_apply_json_on_a_bad_file_prints_a_json_refusal(tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("KEYROTOR_DATABASE_URL", f"sqlite:///{tmp_path}/k.db")
    bad = tmp_path / "inv.yaml"
    bad.write_text("providers: {}\nkeys:\n  - nope\n")
    assert main(["config", "apply", str(bad), "--json"]) == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc["applied"] is False and doc["problems"]
