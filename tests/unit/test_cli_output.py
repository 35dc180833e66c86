"""Output for people and scripts: full identifiers, ellipsised prose, run-id prefixes, describe,
-o json|yaml|wide, colour rules, filters, completion, no database file created by a read."""

from __future__ import annotations

import io
import json
from datetime import timedelta

import pytest
import yaml

from tests.unit.test_cli_read import NOW, db, run_cli  # noqa: F401 - the seeded database fixture
from worker.cli import output
from worker.db.models import AuditEvent, ManagedKey, RotationRun
from worker.protocol.states import RunState
from worker.db.session import make_engine, session_scope
from worker.settings import get_settings
from sqlmodel import select

LONG_ERROR = ("revoke: template '{base_url}/api/api-key/{key_id}': {key_id} has no value; "
              + "padding " * 60 + "THE-ACTIONABLE-END")
RUN_A = "6375ee59" + "a" * 24
RUN_B = "6375ee59" + "b" * 24
RUN_C = "9f00" + "c" * 28


@pytest.fixture
def hexdb(db):  # type: ignore[no-untyped-def]
    """The seeded database plus runs with real (32 hex) ids, two sharing an 8-character prefix."""
    engine = make_engine(db)
    with session_scope(engine) as s:
        billing = s.exec(select(ManagedKey).where(ManagedKey.name == "alloy/billing")).one()
        for rid, minutes in ((RUN_A, 300), (RUN_B, 200), (RUN_C, 100)):
            s.add(RotationRun(id=rid, key_id=billing.id, state=RunState.failed, trigger="manual", reason="manual",
                              requested_by="cli:bob", created_at=NOW - timedelta(minutes=minutes),
                              finished_at=NOW - timedelta(minutes=minutes - 1), last_error=LONG_ERROR))
        s.flush()
        s.add(AuditEvent(at=NOW - timedelta(minutes=99), run_id=RUN_C, key_id=billing.id, actor="worker:h1",
                         event="state_changed", from_state="verified", to_state="failed",
                         detail={"error": "boom", "sinks": {"app": "ok"}, "flags": [1, 2]}))
    engine.dispose()
    yield db


def test_runs_table_shows_full_run_ids_and_ellipsises_the_error(hexdb, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run_cli(capsys, "runs", "--key", "alloy/billing")
    assert code == 0
    for rid in (RUN_A, RUN_B, RUN_C):
        assert rid in out  # never cropped
    row = next(line for line in out.splitlines() if line.startswith(RUN_C))
    assert row.endswith("…") and "THE-ACTIONABLE-END" not in row
    code, out, _ = run_cli(capsys, "runs", "--key", "alloy/billing", "-o", "wide")
    assert "THE-ACTIONABLE-END" in out  # wide shortens nothing


def test_history_audit_trail_shows_full_run_ids(hexdb, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run_cli(capsys, "history", "alloy/billing")
    assert code == 0
    trail = out.split("audit trail", 1)[1]
    assert RUN_C in trail


def test_describe_shows_one_run_in_full_by_prefix(hexdb, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run_cli(capsys, "describe", "9f00")
    assert code == 0, err
    assert RUN_C in out and "THE-ACTIONABLE-END" in out and "alloy/billing" in out
    assert "verified → failed" in out
    code, out2, _ = run_cli(capsys, "show", RUN_C)
    assert code == 0 and out2 == out
    code, out, _ = run_cli(capsys, "describe", "9f00", "-o", "json")
    doc = json.loads(out)
    assert doc["run"]["id"] == RUN_C and doc["run"]["last_error"] == LONG_ERROR and doc["run"]["state"] == "failed"
    assert doc["events"][0]["detail"] == {"error": "boom", "sinks": {"app": "ok"}, "flags": [1, 2]}


@pytest.mark.parametrize("argv", [["describe", "6375ee59"], ["resolve", "6375ee59"], ["deposit", "6375ee59"],
                                  ["cancel", "6375ee59"], ["resolve", "6375ee59", "--action", "retry"]])
def test_an_ambiguous_prefix_lists_the_candidates_and_exits_2(hexdb, capsys, argv) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "ambiguous" in lines[0] and RUN_A in lines[0] and RUN_B in lines[0]


@pytest.mark.parametrize("argv", [["describe", "nosuchrun"], ["resolve", "nosuchrun"], ["deposit", "nosuchrun"],
                                  ["cancel", "nosuchrun"], ["resolve", "nosuchrun", "--action", "retry"]])
def test_an_unknown_run_is_the_same_usage_error_everywhere(hexdb, capsys, argv) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    # deposit also takes a key's name, so it says neither matched
    missing = "no run or key 'nosuchrun'" if argv[0] == "deposit" else "no run 'nosuchrun'"
    assert err.strip().startswith(f"keyrotor: error: {missing}; ") and len(err.strip().splitlines()) == 1


def test_resolve_accepts_a_unique_prefix(hexdb, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run_cli(capsys, "resolve", "9f00")  # a failed run: found by its prefix, nothing to resolve
    assert code == 1
    assert out.strip() == f"run {RUN_C} is failed: it does not need attention; nothing to resolve"
    code, out, err = run_cli(capsys, "resolve", "run-", "-o", "json")
    assert code == 2 and "ambiguous" in err


@pytest.mark.parametrize("command", [["status"], ["runs"], ["history", "alloy/reporting"], ["describe", "run-2"], ["plan"]])
def test_read_commands_speak_json_and_yaml_with_the_same_shape(hexdb, capsys, command) -> None:  # type: ignore[no-untyped-def]
    code, as_json, _ = run_cli(capsys, *command, "-o", "json")
    assert code == 0
    code, as_yaml, _ = run_cli(capsys, *command, "-o", "yaml")
    assert code == 0
    as_json_doc, as_yaml_doc = json.loads(as_json), yaml.safe_load(as_yaml)
    as_json_doc.pop("generated_at", None), as_yaml_doc.pop("generated_at", None)
    assert as_json_doc == as_yaml_doc
    code, legacy, _ = run_cli(capsys, *command, "--json")
    legacy_doc = json.loads(legacy)
    legacy_doc.pop("generated_at", None)
    assert legacy_doc == as_json_doc
    code, wide, _ = run_cli(capsys, *command, "-o", "wide")
    assert code == 0 and wide.strip()


def test_history_limit_applies_to_the_audit_trail(db, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run_cli(capsys, "history", "alloy/reporting", "--limit", "1", "-o", "json")
    doc = json.loads(out)
    assert len(doc["runs"]) == 1 and len(doc["events"]) == 1
    assert doc["events"][0]["to_state"] == "prechecked"  # the newest


def test_audit_details_print_as_json_not_python_reprs(hexdb, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run_cli(capsys, "history", "alloy/billing", "-o", "wide")
    assert 'sinks={"app":"ok"}' in out and "flags=[1,2]" in out
    assert "{'app': 'ok'}" not in out


def test_status_filters_by_provider_and_stage(db, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run_cli(capsys, "status", "--stage", "needs_attention", "-o", "json")
    assert [k["key"] for k in json.loads(out)["keys"]] == ["alloy/billing"]
    code, out, _ = run_cli(capsys, "status", "--provider", "nosuch", "-o", "json")
    assert json.loads(out)["keys"] == []
    code, out, err = run_cli(capsys, "status", "--stage", "sideways")
    assert code == 2 and "unknown stage 'sideways'" in err and "in_grace" in err


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("argv,env,coloured", [
    (["status"], {}, True),
    (["--no-color", "status"], {}, False),
    (["status"], {"NO_COLOR": "1"}, False),
])
def test_states_are_coloured_only_on_a_terminal_without_no_color(db, monkeypatch, argv, env, coloured) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(output, "_colour_off", False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    tty = _Tty()
    monkeypatch.setattr("sys.stdout", tty)
    from worker.cli.main import main

    assert main(argv) == 0
    assert ("\x1b[" in tty.getvalue()) is coloured
    assert "needs_attention" in tty.getvalue()


def test_a_pipe_gets_no_colour(db, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run_cli(capsys, "status")
    assert code == 0 and "\x1b[" not in out


def test_read_commands_do_not_create_a_missing_sqlite_file(tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KEYROTOR_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    try:
        for argv in (["status"], ["runs"], ["history", "a/b"], ["plan"], ["describe", "abc"]):
            code, out, err = run_cli(capsys, *argv)
            assert code == 2 and out == "", argv
            assert len(err.strip().splitlines()) == 1 and "no database at" in err and "KEYROTOR_DATABASE_URL" in err
    finally:
        get_settings.cache_clear()
    assert list(tmp_path.iterdir()) == []


def test_cli_commands_log_no_info_lines_even_when_the_pod_sets_info(db, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import logging

    from worker.cli.common import cli_log_level, set_verbosity

    monkeypatch.setenv("KEYROTOR_LOG_LEVEL", "INFO")
    get_settings.cache_clear()
    assert cli_log_level(get_settings()) == "WARNING"
    code, out, err = run_cli(capsys, "-v", "status")
    try:
        assert code == 0 and logging.getLogger().level == logging.INFO  # -v asks for INFO
    finally:
        set_verbosity(0)
    code, out, err = run_cli(capsys, "status")
    assert code == 0 and err == "" and logging.getLogger().level == logging.WARNING


def test_shell_completion_is_offered(capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """`--show-completion` prints the script for the shell it runs in (typer asks shellingham,
    which reads the process's ancestors; pinned here so the test does not depend on who runs it)."""
    import shellingham

    from worker.cli.main import main

    monkeypatch.setattr(shellingham, "detect_shell", lambda: ("bash", "/bin/bash"))
    code = main(["--show-completion"])
    out = capsys.readouterr().out
    assert code == 0 and "_KEYROTOR_COMPLETE=complete_bash" in out and "complete -o default" in out


def test_help_lists_the_exit_codes_and_flags_take_no_value(capsys) -> None:  # type: ignore[no-untyped-def]
    from worker.cli.main import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "Exit codes: 0 ok · 1 " in " ".join(out.split()) and "130 interrupted" in " ".join(out.split())
    assert main(["status", "--help"]) == 0
    out = capsys.readouterr().out
    assert "<bool>" not in out and "--json" in out


def test_counts_are_pluralised() -> None:
    from worker.text import count

    assert count(1, "provider") == "1 provider" and count(0, "key") == "0 keys" and count(3, "integration") == "3 integrations"
