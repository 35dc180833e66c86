"""``keyrotor ping`` (the chart's ``helm test`` hook) against real PostgreSQL, Redis and Vault
(the stand-in over HTTP, or a real Vault): exit 0 when all answer and Vault accepts the login,
exit 1 naming the one that does not, never printing a password or token."""

from __future__ import annotations

import json

import pytest

from worker.cli.main import main
from worker.settings import get_settings

pytestmark = pytest.mark.integration


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, pg_url: str, redis_url: str, vault) -> pytest.MonkeyPatch:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("KEYROTOR_DATABASE_URL", pg_url)
    monkeypatch.setenv("KEYROTOR_REDIS_URL", redis_url)
    monkeypatch.setenv("VAULT_ADDR", vault.addr)
    monkeypatch.setenv("VAULT_TOKEN", vault.token)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def test_ping_all_reachable(env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ping", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True
    assert [c["name"] for c in doc["checks"]] == ["database", "redis", "vault"]
    assert all(c["ok"] for c in doc["checks"]), doc
    assert "schema revision" in doc["checks"][0]["detail"] and "logged in" in doc["checks"][2]["detail"]


@pytest.mark.parametrize(("var", "value", "failing"), [
    ("KEYROTOR_REDIS_URL", "redis://:hunter2@127.0.0.1:1/0", "redis"),
    ("KEYROTOR_DATABASE_URL", "postgresql://keyrotor:hunter2@127.0.0.1:1/keyrotor", "database"),
    ("VAULT_TOKEN", "hunter2-not-a-token", "vault"),
])
def test_ping_names_what_is_unreachable(env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                        var: str, value: str, failing: str) -> None:
    env.setenv(var, value)
    get_settings.cache_clear()
    assert main(["ping", "--timeout", "1"]) == 1
    out = capsys.readouterr()
    lines = {line.split()[0]: line for line in out.out.splitlines()}
    assert set(lines) == {"database", "redis", "vault"}
    for name, line in lines.items():
        assert (" FAILED " in line) == (name == failing), line
    assert "hunter2" not in out.out + out.err
    assert "Traceback" not in out.err
