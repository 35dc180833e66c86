"""`keyrotor rotate / deposit`: argument checks, --wait outcomes and exit codes, secret input."""

from __future__ import annotations

import io
import json
import threading
import time
from datetime import datetime, timezone

import pytest

from worker.cli.act_cmds import WaitUntil, wait_for_runs, read_deposit_secret
from worker.cli.common import EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT
from worker.cli.main import main
from worker.db.migrate import upgrade
from worker.db.models import AuditEvent, ManagedKey, ProviderRecord, RotationRun
from worker.protocol.states import RunState
from worker.db.session import make_engine, session_scope
from worker.settings import get_settings


@pytest.fixture
def engine(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path}/rotate.db"
    monkeypatch.setenv("KEYROTOR_DATABASE_URL", url)
    get_settings.cache_clear()
    upgrade(url)
    eng = make_engine(url)
    with session_scope(eng) as s:
        s.add(ProviderRecord(name="alloy", kind="http", spec={}))
        s.flush()
        s.add(ManagedKey(name="alloy/a", provider="alloy", credential_type="api_key", owner="o", vault_path="a"))
        s.flush()
        s.add(RotationRun(id="r1", key_id=1, state=RunState.requested, trigger="manual", requested_by="cli:t",
                          created_at=datetime.now(timezone.utc)))
    yield eng
    eng.dispose()
    get_settings.cache_clear()


def _move(engine, states: list[str], delay: float = 0.05) -> threading.Thread:  # type: ignore[no-untyped-def]
    """Play a run through ``states`` in the background, auditing each change like the pipeline does."""

    def play() -> None:
        prev = "requested"
        for state in states:
            time.sleep(delay)
            with session_scope(engine) as s:
                run = s.get(RotationRun, "r1")
                run.state = RunState(state)
                s.add(AuditEvent(at=datetime.now(timezone.utc), run_id="r1", key_id=1, actor="worker:t",
                                 event="state_changed", from_state=prev, to_state=state,
                                 detail={"fingerprint": "sha256:abcdef0123456789"}))
            prev = state

    thread = threading.Thread(target=play)
    thread.start()
    return thread


def _summary() -> list[dict]:
    return [{"run_id": "r1", "key": "alloy/a", "state": "requested", "created": True}]


def test_wait_succeeds_on_completed_and_narrates_each_change(engine, capsys) -> None:  # type: ignore[no-untyped-def]
    t = _move(engine, ["issued", "prechecked", "promoted", "propagated", "verified", "retired", "completed"], 0.01)
    code = wait_for_runs(engine, _summary(), until=WaitUntil.completed, timeout=10, narrate=True, interval=0.02)
    t.join()
    out = capsys.readouterr().out
    assert code == EXIT_OK
    assert "requested → issued" in out and "retired → completed" in out and "fingerprint=abcdef01" in out
    assert out.count("→") == 7  # one line per state change, none missed even when faster than the poll


@pytest.mark.parametrize("end", ["rolled_back", "failed", "needs_attention"])
def test_wait_fails_when_the_run_did_not_succeed(engine, capsys, end) -> None:  # type: ignore[no-untyped-def]
    t = _move(engine, ["issued", end])
    code = wait_for_runs(engine, _summary(), until=WaitUntil.completed, timeout=10, narrate=False, interval=0.02)
    t.join()
    assert code == EXIT_FAILED
    assert capsys.readouterr().out == ""


def test_wait_until_verified_stops_before_the_grace_period(engine) -> None:  # type: ignore[no-untyped-def]
    t = _move(engine, ["issued", "prechecked", "promoted", "propagated", "verified"])
    code = wait_for_runs(engine, _summary(), until=WaitUntil.verified, timeout=10, narrate=False, interval=0.02)
    t.join()
    assert code == EXIT_OK


def test_wait_times_out_with_exit_3(engine) -> None:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    code = wait_for_runs(engine, _summary(), until=WaitUntil.completed, timeout=0.2, narrate=False, interval=0.05)
    assert code == EXIT_TIMEOUT and time.monotonic() - t0 < 2


@pytest.mark.parametrize("argv, message", [
    (["rotate"], "which key?"),
    (["rotate", "alloy/a", "--provider", "alloy", "--all"], "not both"),
    (["rotate", "--all", "--emergency"], "needs both --provider P and --all"),
    (["rotate", "--provider", "alloy", "--all"], "add --emergency to confirm"),
])
def test_rotate_usage_errors_exit_2(engine, capsys, argv, message) -> None:  # type: ignore[no-untyped-def]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_deposit_refuses_a_run_that_is_not_waiting(engine, capsys) -> None:  # type: ignore[no-untyped-def]
    code = main(["deposit", "r1"])
    err = capsys.readouterr().err
    assert code == 2 and "not awaiting_deposit" in err
    code = main(["deposit", "nope"])
    assert code == 2 and "no run or key 'nope'" in capsys.readouterr().err


def test_deposit_secret_comes_from_stdin_never_argv(monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("  pat_0123456789abcdef\n"))
    secret = read_deposit_secret("prompt: ")
    assert secret.reveal() == "pat_0123456789abcdef"
    assert "pat_" not in repr(secret)


def test_deposit_empty_input_is_a_usage_error(monkeypatch) -> None:
    import typer

    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    with pytest.raises(typer.Exit) as exc:
        read_deposit_secret("prompt: ")
    assert exc.value.exit_code == 2


def test_json_helpers_render_enums_and_times() -> None:
    from worker.cli.output import dumps

    doc = json.loads(dumps({"s": RunState.verified, "t": datetime(2026, 1, 1, tzinfo=timezone.utc)}))
    assert doc == {"s": "verified", "t": "2026-01-01T00:00:00Z"}


def test_rotate_records_the_run_and_enqueues_its_first_step(engine, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Through the real request_rotation/enqueue_run, on a StubBroker instead of Redis."""
    from worker.runtime import broker as broker_mod

    with session_scope(engine) as s:  # finish the fixture's open run so the key can rotate again
        run = s.get(RotationRun, "r1")
        run.state, run.finished_at = RunState.completed, datetime.now(timezone.utc)
    stub = broker_mod.make_stub_broker()
    original_setup = broker_mod.setup_broker
    monkeypatch.setattr("worker.cli.act_cmds._require_redis", lambda url: None)
    monkeypatch.setattr(broker_mod, "setup_broker", lambda settings=None, broker=None: original_setup(broker=stub))
    try:
        code = main(["rotate", "alloy/a", "--reason", "drill", "--json"])
        out = capsys.readouterr().out
        assert code == 0
        doc = json.loads(out)
        assert doc["runs"][0]["key"] == "alloy/a" and doc["runs"][0]["created"] is True
        run_id = doc["runs"][0]["run_id"]
        queued = [m for q in stub.queues for m in stub.queues[q].queue]
        assert any(run_id in m.decode() for m in queued), queued
        with session_scope(engine) as s:
            row = s.get(RotationRun, run_id)
            assert row.reason == "drill" and row.requested_by.startswith("cli:") and row.trigger == "manual"
        # the same request again joins the open run instead of creating a second one
        code = main(["rotate", "alloy/a", "--json"])
        again = json.loads(capsys.readouterr().out)
        assert code == 0 and again["runs"][0]["run_id"] == run_id and again["runs"][0]["created"] is False
    finally:
        broker_mod.reset_broker()


def test_rotate_without_a_reachable_redis_fails_before_recording(engine, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("KEYROTOR_REDIS_URL", "redis://127.0.0.1:1/0")
    get_settings.cache_clear()
    code = main(["rotate", "alloy/a"])
    assert code == 1 and "does not answer" in capsys.readouterr().err
    with session_scope(engine) as s:
        assert len(s.exec(__import__("sqlmodel").select(RotationRun)).all()) == 1


def test_emergency_reports_keys_it_could_not_rotate_and_exits_1(engine, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A run waiting for a person that the emergency cannot take over safely (an issued key, no
    known stop state): never a silent join — a `not rotated` line on stderr and exit 1."""
    from worker.db.models import KeyVersion, VersionStage
    from worker.runtime import broker as broker_mod

    with session_scope(engine) as s:
        version = KeyVersion(key_id=1, run_id="r1", credential_type="api_key", stage=VersionStage.pending,
                             provider_key_id="k-1", fingerprint="sha256:00")
        s.add(version)
        s.flush()
        run = s.get(RotationRun, "r1")
        run.state, run.new_version_id = RunState.needs_attention, version.id
    stub = broker_mod.make_stub_broker()
    original_setup = broker_mod.setup_broker
    monkeypatch.setattr("worker.cli.act_cmds._require_redis", lambda url: None)
    monkeypatch.setattr(broker_mod, "setup_broker", lambda settings=None, broker=None: original_setup(broker=stub))
    try:
        code = main(["rotate", "--provider", "alloy", "--all", "--emergency"])
        captured = capsys.readouterr()
        assert code == EXIT_FAILED
        assert "not rotated: alloy/a: run r1 is needs_attention" in captured.err
        assert "1 key not rotated" in captured.err
        code = main(["rotate", "--provider", "alloy", "--all", "--emergency", "--json"])
        doc = json.loads(capsys.readouterr().out)
        assert code == EXIT_FAILED and [i["run_id"] for i in doc["not_rotated"]] == ["r1"]
    finally:
        broker_mod.reset_broker()


def test_an_emergency_sends_its_runs_first_steps_in_one_batch(engine, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """`rotate --provider P --all --emergency` hands every created run's first step to the broker
    in one ``enqueue_many`` (one round trip to Redis), not one send per run."""
    from worker.runtime import broker as broker_mod

    with session_scope(engine) as s:
        run = s.get(RotationRun, "r1")
        run.state, run.finished_at = RunState.completed, datetime.now(timezone.utc)
        for name in ("alloy/b", "alloy/c"):
            s.add(ManagedKey(name=name, provider="alloy", credential_type="api_key", owner="o", vault_path=name))
    stub = broker_mod.make_stub_broker()
    batches: list[list[str]] = []

    def enqueue_many(messages):  # type: ignore[no-untyped-def]
        batches.append([m.args[0] for m in messages])
        return [stub.enqueue(m) for m in messages]

    stub.enqueue_many = enqueue_many  # type: ignore[attr-defined]
    original_setup = broker_mod.setup_broker
    monkeypatch.setattr("worker.cli.act_cmds._require_redis", lambda url: None)
    monkeypatch.setattr(broker_mod, "setup_broker", lambda settings=None, broker=None: original_setup(broker=stub))
    try:
        code = main(["rotate", "--provider", "alloy", "--all", "--emergency", "--json"])
        doc = json.loads(capsys.readouterr().out)
        assert code == EXIT_OK
        created = sorted(item["run_id"] for item in doc["runs"] if item["created"])
        assert len(created) == 3 and [sorted(batch) for batch in batches] == [created]
        queued = [m.decode() for q in stub.queues for m in stub.queues[q].queue]
        assert all(any(run_id in m for m in queued) for run_id in created)
    finally:
        broker_mod.reset_broker()


def test_deposit_takes_the_key_name_and_finds_its_waiting_run(engine) -> None:  # type: ignore[no-untyped-def]
    """The reminder names the key; `keyrotor deposit KEY` finds the key's run awaiting a deposit."""
    import typer

    from worker.cli.act_cmds import find_awaiting_run

    with session_scope(engine) as s:
        s.get(RotationRun, "r1").state = RunState.awaiting_deposit
    with session_scope(engine) as s:
        assert find_awaiting_run(s, "alloy/a").id == "r1"
        assert find_awaiting_run(s, "r1").id == "r1"
    with session_scope(engine) as s:
        run = s.get(RotationRun, "r1")
        run.state, run.finished_at = RunState.cancelled, datetime.now(timezone.utc)
    with session_scope(engine) as s, pytest.raises(typer.Exit) as exc:
        find_awaiting_run(s, "alloy/a")
    assert exc.value.exit_code == 2
