"""The CLI answers bad arguments and unreachable services with one line on stderr, no traceback."""

from __future__ import annotations

import socket

import pytest

from worker.cli.main import main
from worker.settings import get_settings


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(autouse=True)
def _fresh_settings():  # type: ignore[no-untyped-def]
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.mark.parametrize("argv", [["rotate", "--bogus"], ["no-such-command"], ["runs", "--limit", "many"]])
def test_usage_errors_exit_2_with_click_message(argv, capsys) -> None:  # type: ignore[no-untyped-def]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    assert "Error" in err or "error" in err


def test_unreachable_database_is_one_line_without_password(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    url = f"postgresql://postgres:hunter2secret@127.0.0.1:{_closed_port()}/keyrotor"
    monkeypatch.setenv("KEYROTOR_DATABASE_URL", url)
    code = main(["status"])
    err = capsys.readouterr().err
    assert code == 1  # a service that did not answer, like Redis
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("keyrotor: error: the database at postgresql") and "postgres:***@127.0.0.1" in lines[0]
    assert "KEYROTOR_DATABASE_URL" in lines[0]
    assert "hunter2secret" not in err


def _unreachable_redis_with_password(monkeypatch, tmp_path) -> str:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("KEYROTOR_DATABASE_URL", f"sqlite:///{tmp_path}/k.db")
    url = f"redis://:redispass123@127.0.0.1:{_closed_port()}/0"
    monkeypatch.setenv("KEYROTOR_REDIS_URL", url)
    monkeypatch.setenv("KEYROTOR_METRICS_PORT", "0")
    return url


@pytest.mark.parametrize("argv", [["worker"], ["scheduler"], ["rotate", "alloy/x"]])
def test_unreachable_redis_is_one_line_without_password(argv, monkeypatch, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    _unreachable_redis_with_password(monkeypatch, tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1, err
    assert "redispass123" not in err
    assert "keyrotor: error: Redis at redis://:***@127.0.0.1" in err
    assert "KEYROTOR_REDIS_URL" in err


def test_redis_clients_have_socket_timeouts() -> None:
    from worker.providers.ratelimit import RedisRateLimiter

    limiter = RedisRateLimiter.from_url(f"redis://127.0.0.1:{_closed_port()}/0")
    kwargs = limiter._client.connection_pool.connection_kwargs  # type: ignore[attr-defined]
    assert kwargs.get("socket_timeout") and kwargs.get("socket_connect_timeout")


def test_config_check_reads_keyrotor_config_when_no_file_is_given(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "config" / "keyrotor.example.yaml"
    monkeypatch.setenv("KEYROTOR_CONFIG", str(example))
    assert main(["config", "check"]) == 0
    assert capsys.readouterr().out.startswith("ok: ")
    monkeypatch.delenv("KEYROTOR_CONFIG")
    assert main(["config", "check"]) == 2
    assert "Traceback" not in capsys.readouterr().err
