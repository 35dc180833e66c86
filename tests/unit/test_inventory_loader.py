"""`keyrotor config check`: every problem located at FILE:LINE with its field path, via the real CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from worker.cli import main as cli_main
from worker.inventory.loader import InventoryError, check_text, load_inventory

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "keyrotor.example.yaml"
TEXT = EXAMPLE.read_text()


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    cli_main._register()
    return CliRunner()


def line_of(text: str, needle: str, occurrence: int = 1) -> int:
    """1-based line of the n-th line containing ``needle``."""
    hits = [i + 1 for i, line in enumerate(text.splitlines()) if needle in line]
    assert len(hits) >= occurrence, f"{needle!r} not in text"
    return hits[occurrence - 1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "inventory.yaml"
    path.write_text(text)
    return path


def check(runner: CliRunner, path: Path, *extra: str):  # type: ignore[no-untyped-def]
    result = runner.invoke(cli_main.app, ["config", "check", str(path), *extra])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def test_example_passes(runner: CliRunner) -> None:
    result = check(runner, EXAMPLE)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "ok: 4 providers, 5 keys, 4 integrations"


def test_example_json(runner: CliRunner) -> None:
    result = check(runner, EXAMPLE, "--json")
    assert result.exit_code == 0
    assert json.loads(result.output) == {"ok": True, "file": str(EXAMPLE), "summary": "4 providers, 5 keys, 4 integrations", "problems": []}


def test_syntax_error_has_its_line(runner: CliRunner, tmp_path: Path) -> None:
    text = TEXT.replace("    owner: billing-team@example.com\n", "    owner: billing-team@example.com\n      bad: indent\n")
    path = write(tmp_path, text)
    result = check(runner, path)
    assert result.exit_code == 2
    line = line_of(text, "bad: indent")
    assert f"{path}:{line}: YAML syntax error" in result.output
    assert "Traceback" not in result.output


def test_unterminated_flow_mapping(runner: CliRunner, tmp_path: Path) -> None:
    text = TEXT.replace("rate_limit: {requests: 120, per: 60s}", "rate_limit: {requests: 120, per: 60s")
    result = check(runner, write(tmp_path, text))
    assert result.exit_code == 2
    assert re.search(r"inventory\.yaml:\d+: YAML syntax error", result.output)


def test_unknown_field(runner: CliRunner, tmp_path: Path) -> None:
    text = TEXT.replace("    grace_period: 30m ", "    grace_priod: 30m ")
    path = write(tmp_path, text)
    result = check(runner, path)
    assert result.exit_code == 2
    assert f"{path}:{line_of(text, 'grace_priod')}: keys.alloy/billing.grace_priod: unknown field 'grace_priod'" in result.output


def test_missing_provider(runner: CliRunner, tmp_path: Path) -> None:
    text = TEXT.replace("    provider: asana\n", "    provider: asanna\n")
    path = write(tmp_path, text)
    result = check(runner, path)
    assert result.exit_code == 2
    expected = f"{path}:{line_of(text, 'provider: asanna')}: keys.asana/automation.provider: unknown provider 'asanna' (known: alloy, asana, partner-oauth, workfront)"
    assert expected in result.output


def test_literal_secret(runner: CliRunner, tmp_path: Path) -> None:
    text = TEXT.replace('token: {vault: "secret/keyrotor/providers/alloy#admin_token"}', "token: sk_live_0123456789")
    path = write(tmp_path, text)
    result = check(runner, path)
    assert result.exit_code == 2
    line = line_of(text, "token: sk_live_")
    assert (f'{path}:{line}: providers.alloy.auth.token: a literal secret is not allowed here; '
            'use {vault: "MOUNT/PATH#FIELD"} or {env: NAME}') in result.output
    assert "sk_live_0123456789" not in result.output


def test_bad_duration(runner: CliRunner, tmp_path: Path) -> None:
    text = TEXT.replace("    max_age: 30d\n", "    max_age: 30 days\n")
    path = write(tmp_path, text)
    result = check(runner, path)
    assert result.exit_code == 2
    assert f"{path}:{line_of(text, 'max_age: 30 days')}: policies.short-lived.max_age: expected a duration" in result.output


def test_every_problem_is_reported_together(runner: CliRunner, tmp_path: Path) -> None:
    text = (TEXT.replace("    provider: asana\n", "    provider: asanna\n")
                .replace("    max_age: 30d\n", "    max_age: soon\n")
                .replace("    include_secret: false\n", "    include_secret: false\n    colour: blue\n"))
    path = write(tmp_path, text)
    result = check(runner, path)
    lines = [l for l in result.output.splitlines() if l.startswith(str(path) + ":")]
    assert len(lines) == 3, result.output
    numbers = [int(l.split(":")[1]) for l in lines]
    assert numbers == sorted(numbers)
    assert "3 problems in" in result.output


def test_duplicate_key_is_flagged(runner: CliRunner, tmp_path: Path) -> None:
    text = TEXT.replace("    owner: billing-team@example.com\n", "    owner: billing-team@example.com\n    owner: someone-else@example.com\n")
    path = write(tmp_path, text)
    result = check(runner, path)
    assert result.exit_code == 2
    first, second = line_of(text, "owner: billing-team"), line_of(text, "owner: someone-else")
    assert f"{path}:{second}: keys.alloy/billing.owner: duplicate key (first defined on line {first})" in result.output


def test_missing_field_points_at_its_parent(runner: CliRunner, tmp_path: Path) -> None:
    text = TEXT.replace("    owner: ops-automation@example.com\n", "")
    path = write(tmp_path, text)
    result = check(runner, path)
    assert f"{path}:{line_of(text, '  asana/automation:')}: keys.asana/automation.owner: required field is missing" in result.output


def test_union_tags_do_not_leak_into_paths(tmp_path: Path) -> None:
    text = TEXT.replace('signing_secret: {vault: "secret/keyrotor/integrations/mesh#signing_secret"}',
                        'signing_secret: {vault: "not-a-ref"}')
    _, problems = check_text(text, "inv.yaml")
    assert [(p.line, p.path) for p in problems] == [(line_of(text, "not-a-ref"), "integrations.mesh-workflows.signing_secret.vault")]


def test_mode_without_calls_is_located(tmp_path: Path) -> None:
    text = TEXT.replace("""      revoke:
        method: DELETE
        url: "{base_url}/api/api-key/{key_id}"
""", "")
    _, problems = check_text(text, "inv.yaml")
    assert [(p.line, p.path) for p in problems] == [(line_of(text, "    calls:"), "providers.alloy.calls")]
    assert "'revoke' is missing" in problems[0].message


def test_empty_and_non_mapping_files(runner: CliRunner, tmp_path: Path) -> None:
    for text in ("", "- just\n- a list\n", "version: 1\nproviders: {}\nkeys: {}\nextra: 1\n"):
        result = check(runner, write(tmp_path, text))
        assert result.exit_code == 2, text


def test_missing_file(runner: CliRunner, tmp_path: Path) -> None:
    result = check(runner, tmp_path / "nope.yaml")
    assert result.exit_code == 2
    assert "no such file" in result.output


def test_load_inventory_raises_with_problems(tmp_path: Path) -> None:
    path = write(tmp_path, TEXT.replace("    provider: asana\n", "    provider: asanna\n"))
    with pytest.raises(InventoryError) as info:
        load_inventory(path)
    assert len(info.value.problems) == 1 and str(path) in str(info.value)
    assert load_inventory(EXAMPLE).summary() == "4 providers, 5 keys, 4 integrations"


def test_installed_entry_point_exits_2_without_traceback(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = write(tmp_path, "version: 1\nkeys: [\n")
    exe = Path(sys.executable).with_name("keyrotor")
    if not exe.exists():
        pytest.skip("keyrotor entry point not installed in this environment")
    proc = subprocess.run([str(exe), "config", "check", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"{path}:" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout


def test_a_malformed_notification_url_is_not_echoed(runner: CliRunner, tmp_path: Path) -> None:
    """A Slack incoming-webhook URL is a credential: a typo in one must not be printed back."""
    leaked = "hxxps://hooks.slack.example/services/T000/B000/sekrit-token-123"
    text = TEXT.replace("{kind: slack, url: {env: KEYROTOR_SLACK_WEBHOOK_URL}", "{kind: slack, url: " + leaked)
    assert leaked in text
    path = write(tmp_path, text)
    result = check(runner, path)
    assert result.exit_code == 2
    assert "expected an absolute http(s) URL" in result.output
    assert "sekrit-token-123" not in result.output


def test_kubernetes_secret_problems_have_their_lines(runner: CliRunner, tmp_path: Path) -> None:
    text = (TEXT.replace("    secret: billing-api-keys\n", "    secret: Billing_Keys\n")
                .replace("      - {kind: StatefulSet, name: billing-worker}\n", "      - {kind: DaemonSet, name: billing-worker}\n")
                .replace("    rollout_timeout: 10m\n", "    rollout_timeout: 0s\n"))
    path = write(tmp_path, text)
    result = check(runner, path)
    assert result.exit_code == 2
    assert f"{path}:{line_of(text, 'secret: Billing_Keys')}: integrations.billing-k8s.secret: not a valid Kubernetes object name" in result.output
    assert f"{path}:{line_of(text, 'kind: DaemonSet')}: integrations.billing-k8s.workloads[1].kind:" in result.output
    assert "'Deployment' or 'StatefulSet'" in result.output
    assert f"{path}:{line_of(text, 'rollout_timeout: 0s')}: integrations.billing-k8s.rollout_timeout: must be longer than zero" in result.output
    assert "Traceback" not in result.output


def test_kubernetes_secret_workloads_listed_twice_are_refused(tmp_path: Path) -> None:
    text = TEXT.replace("      - {kind: StatefulSet, name: billing-worker}\n", "      - {kind: Deployment, name: billing-api}\n")
    with pytest.raises(InventoryError, match="listed more than once: Deployment/billing-api"):
        load_inventory(write(tmp_path, text))
