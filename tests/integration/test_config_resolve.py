"""`keyrotor config check --resolve` and the worker's start-up check: every secret reference of the
inventory is resolved (env and Vault, real Vault API over HTTP), the database, Redis and Vault
must answer, and every problem is reported at once, one line each, without a secret value."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from typer.testing import CliRunner

pytestmark = pytest.mark.integration

INVENTORY = """\
version: 1
providers:
  alloy:
    kind: http
    base_url: https://api.alloyapp.example
    auth:
      type: bearer
      token: {{vault: "{mount}/keyrotor/providers/alloy#admin_token"}}
    credential_types:
      api_key: {{}}
    calls:
      issue:
        method: POST
        url: "{{base_url}}/api/api-key"
        response: {{secret: "$.apiKey", key_id: "$.id"}}
      verify:
        url: "{{base_url}}/api/user/me"
        auth: {{type: bearer, token: "{{secret}}"}}
      revoke:
        method: DELETE
        url: "{{base_url}}/api/api-key/{{key_id}}"
integrations:
  reporting:
    kind: webhook
    url: https://reporting.internal.example/hooks/keyrotor
    signing_secret: {{env: KR_RESOLVE_WEBHOOK_SECRET}}
  mesh:
    kind: webhook
    url: https://mesh.internal.example/keyrotor
    signing_secret: {{vault: "{mount}/keyrotor/integrations/mesh#signing_secret"}}
notifications:
  - kind: slack
    url: {{env: KR_RESOLVE_SLACK_URL}}
keys:
  alloy/billing:
    provider: alloy
    credential_type: api_key
    owner: billing@example.com
    vault: {{mount: {mount}, path: apps/billing}}
    integrations: [reporting, mesh]
"""


@pytest.fixture
def setup(tmp_path: Path, pg_url: str, redis_url: str, vault: Any, vault_mount: str,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    import hvac

    from worker.settings import get_settings

    admin_token = "alloy-admin-" + secrets.token_hex(12)
    client = hvac.Client(url=vault.addr, token=vault.token)
    client.secrets.kv.v2.create_or_update_secret(path="keyrotor/providers/alloy", mount_point=vault_mount,
                                                 secret={"admin_token": admin_token})
    webhook_secret = "whsec-" + secrets.token_hex(12)
    for name, value in {"KEYROTOR_DATABASE_URL": pg_url, "KEYROTOR_REDIS_URL": redis_url, "VAULT_ADDR": vault.addr,
                        "VAULT_TOKEN": vault.token, "KR_RESOLVE_WEBHOOK_SECRET": webhook_secret}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("KR_RESOLVE_SLACK_URL", raising=False)
    path = tmp_path / "inventory.yaml"
    path.write_text(INVENTORY.format(mount=vault_mount))
    get_settings.cache_clear()
    yield {"file": path, "mount": vault_mount, "values": [admin_token, webhook_secret], "client": client}
    get_settings.cache_clear()


def _line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def invoke(*args: str) -> Any:
    from worker.cli import main as cli_main
    from worker.settings import get_settings

    get_settings.cache_clear()
    cli_main._register()
    return CliRunner().invoke(cli_main.app, list(args))


def test_check_resolve_reports_every_unresolvable_reference_at_its_line(setup: dict[str, Any]) -> None:
    path, mount = setup["file"], setup["mount"]
    plain = invoke("config", "check", str(path))
    assert plain.exit_code == 0, plain.output           # the schema alone cannot know Vault's content

    result = invoke("config", "check", "--resolve", str(path))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith(str(path) + ":")]
    mesh_line = _line_of(path, "keyrotor/integrations/mesh#signing_secret")
    slack_line = _line_of(path, "KR_RESOLVE_SLACK_URL")
    assert any(line.startswith(f"{path}:{mesh_line}: integrations.mesh.signing_secret: ")
               and f"vault:{mount}/keyrotor/integrations/mesh#signing_secret" in line for line in lines), lines
    assert any(line.startswith(f"{path}:{slack_line}: notifications[0].url: ")
               and "env:KR_RESOLVE_SLACK_URL" in line for line in lines), lines
    assert len(lines) == 2, lines                        # the resolvable ones are not reported
    assert "2 problems" in result.output
    for value in setup["values"]:
        assert value not in result.output


def test_check_resolve_passes_when_everything_resolves_and_answers(setup: dict[str, Any],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    setup["client"].secrets.kv.v2.create_or_update_secret(path="keyrotor/integrations/mesh", mount_point=setup["mount"],
                                                         secret={"signing_secret": "mesh-" + secrets.token_hex(8)})
    monkeypatch.setenv("KR_RESOLVE_SLACK_URL", "https://hooks.slack.com/services/T0/B0/" + secrets.token_hex(8))
    result = invoke("config", "check", "--resolve", str(setup["file"]))
    assert result.exit_code == 0, result.output
    assert "every secret reference resolves" in result.output


def test_check_resolve_reports_unreachable_services_with_the_references(setup: dict[str, Any],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYROTOR_REDIS_URL", "redis://:hunter2pass@127.0.0.1:1/0")
    monkeypatch.setenv("KEYROTOR_DATABASE_URL", "postgresql+psycopg://postgres:pgpass99@127.0.0.1:1/nowhere")
    monkeypatch.setenv("VAULT_ADDR", "http://127.0.0.1:1")
    result = invoke("config", "check", "--resolve", str(setup["file"]))
    assert result.exit_code == 2, result.output
    out = result.output
    assert "database: cannot connect" in out and "redis: " in out and "vault: " in out
    # Vault references are reported as not checked (no wait per reference), env ones as usual.
    assert "vault:" in out and "not checked" in out and "env:KR_RESOLVE_SLACK_URL" in out
    assert "hunter2pass" not in out and "pgpass99" not in out and "Traceback" not in out


def test_worker_logs_unresolvable_references_at_start(setup: dict[str, Any], pg_url: str, redis_url: str,
                                                      redis_namespace: str) -> None:
    from worker.db.session import make_engine, session_scope
    from worker.inventory.apply import apply_inventory
    from worker.inventory.loader import load_inventory

    engine = make_engine(pg_url)
    with session_scope(engine) as session:
        apply_inventory(session, load_inventory(setup["file"]), actor="test")
    engine.dispose()
    env = {**os.environ, "KEYROTOR_LOG_FORMAT": "json", "KEYROTOR_METRICS_PORT": "0",
           "KEYROTOR_QUEUE_NAMESPACE": redis_namespace}
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli.main", "worker", "--processes", "1", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 60
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "worker.started" in line:
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    warnings = [json.loads(line) for line in lines if "secret_ref.unresolvable" in line]
    assert sorted(w["reference"] for w in warnings) == sorted([
        f"vault:{setup['mount']}/keyrotor/integrations/mesh#signing_secret", "env:KR_RESOLVE_SLACK_URL"]), lines
    assert {w["level"] for w in warnings} == {"warning"}
    assert {w["where"] for w in warnings} == {"integrations.mesh.signing_secret", "notifications[0].url"}
    text = "".join(lines)
    for value in setup["values"]:
        assert value not in text


def test_apply_with_resolve_refuses_an_inventory_whose_references_do_not_resolve(setup: dict[str, Any],
                                                                                 pg_url: str) -> None:
    import sqlalchemy as sa

    result = invoke("config", "apply", "--resolve", str(setup["file"]))
    assert result.exit_code == 2 and "not applied: 2 problems" in result.output, result.output
    engine = sa.create_engine(pg_url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM provider")).scalar() == 0
    engine.dispose()
