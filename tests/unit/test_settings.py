"""Settings: defaults, normalisation, and one clear line per bad variable."""

from __future__ import annotations

import subprocess
import sys

import pytest

from worker.errors import ConfigError
from worker.settings import DEFAULT_DATABASE_URL, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("KEYROTOR_") or name.startswith("VAULT_"):
            monkeypatch.delenv(name, raising=False)


def test_defaults_need_no_services() -> None:
    settings = load_settings()
    assert settings.database_url == DEFAULT_DATABASE_URL
    assert settings.vault_addr is None
    assert settings.log_format == "json"


def test_postgres_url_uses_psycopg3(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYROTOR_DATABASE_URL", "postgres://u@db/keyrotor")
    assert load_settings().database_url == "postgresql+psycopg://u@db/keyrotor"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("KEYROTOR_DATABASE_URL", "mysql://x/y", "KEYROTOR_DATABASE_URL: expected sqlite:///FILE or postgresql"),
        ("KEYROTOR_REDIS_URL", "localhost:6379", "KEYROTOR_REDIS_URL: expected redis://"),
        ("VAULT_ADDR", "vault:8200", "VAULT_ADDR: expected http(s)://HOST:PORT"),
        ("KEYROTOR_METRICS_PORT", "http", "KEYROTOR_METRICS_PORT: "),
        ("KEYROTOR_LOG_LEVEL", "chatty", "KEYROTOR_LOG_LEVEL: "),
    ],
)
def test_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value).startswith(expected)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://h:6379/abc", "the database 'abc' is not a number"),
        ("redis://:pw-s3cret@h:6379/1x", "the database '1x' is not a number"),
        ("redis://h:6379/0/extra", "is not a number"),
        ("rediss://h:port/0", "the port is not a number"),
        ("redis://h:6379/0?db=two", "the db query parameter must be one number"),
        ("redis://h:6379/1?db=2", "two databases: 1 in the path and 2 in ?db="),
        ("unix://", "a unix:// URL needs the socket's path"),
        ("http://h:6379/0", "expected redis://HOST:PORT/DB"),
        ("redis:///0", "expected redis://HOST:PORT/DB"),
    ],
)
def test_redis_url_is_read_exactly_or_refused(monkeypatch: pytest.MonkeyPatch, url: str, expected: str) -> None:
    # redis-py reads redis://h/abc as database 0: two deployments meant to be apart would share one.
    monkeypatch.setenv("KEYROTOR_REDIS_URL", url)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert message.startswith("KEYROTOR_REDIS_URL: ") and expected in message
    assert "\n" not in message and "s3cret" not in message


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/15", "rediss://:pw@redis.example:6380", "redis://h?db=3",
                                 "redis://h/3?db=3", "unix:///run/redis.sock?db=2", "redis://h:6379/"])
def test_redis_url_forms_that_redis_reads_as_written(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("KEYROTOR_REDIS_URL", url)
    assert load_settings().redis_url == url


def test_vault_addr_without_auth_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAULT_ADDR", "http://127.0.0.1:8200")
    with pytest.raises(ConfigError, match="neither VAULT_TOKEN nor KEYROTOR_VAULT_K8S_ROLE"):
        load_settings()
    monkeypatch.setenv("KEYROTOR_VAULT_K8S_ROLE", "keyrotor")
    assert load_settings().vault_k8s_role == "keyrotor"


def test_token_is_not_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAULT_ADDR", "http://127.0.0.1:8200")
    monkeypatch.setenv("VAULT_TOKEN", "hvs.supersecretvalue123")
    assert "supersecretvalue" not in repr(load_settings())


def test_cli_reports_bad_setting_in_one_line_without_traceback(tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = {"PATH": "/usr/bin:/bin", "KEYROTOR_DATABASE_URL": "mysql://nope/x", "HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "worker.cli.main", "db", "upgrade"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and "KEYROTOR_DATABASE_URL" in lines[0]


def test_step_policy_comes_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.pipeline.context import StepPolicy

    monkeypatch.setenv("KEYROTOR_STEP_MAX_RETRIES", "3")
    monkeypatch.setenv("KEYROTOR_STEP_MIN_BACKOFF_S", "0.5")
    monkeypatch.setenv("KEYROTOR_STEP_MAX_BACKOFF_S", "30")
    monkeypatch.setenv("KEYROTOR_STEP_TIME_LIMIT_S", "45")
    monkeypatch.setenv("KEYROTOR_ACTIVATION_TIMEOUT_S", "600")
    policy = StepPolicy.from_settings(load_settings())
    assert (policy.max_retries, policy.min_backoff_ms, policy.max_backoff_ms) == (3, 500, 30_000)
    assert policy.time_limit_ms == 45_000 and policy.activation_timeout_s == 600


def test_backoff_bounds_must_be_ordered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYROTOR_STEP_MIN_BACKOFF_S", "60")
    monkeypatch.setenv("KEYROTOR_STEP_MAX_BACKOFF_S", "10")
    with pytest.raises(ConfigError, match="KEYROTOR_STEP_MIN_BACKOFF_S must not exceed"):
        load_settings()
