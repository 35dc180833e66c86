"""`rotate --wait` that informs: no worker → early exit 1, Ctrl-C → exit 130 with how to follow,
grace countdown, a default timeout that covers the grace period; `--dry-run`; deposit JSON."""

from __future__ import annotations

import io
import json
import time
from datetime import datetime, timedelta, timezone

import pytest
from sqlmodel import select

from tests.unit.test_cli_rotate import engine  # noqa: F401 - the one-key SQLite fixture
from worker.cli import act_cmds
from worker.cli.act_cmds import STEP_ALLOWANCE_S, WaitUntil, wait_budget, wait_for_runs
from worker.cli.common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_TIMEOUT
from worker.cli.main import main
from worker.db.models import AuditEvent, RotationRun
from worker.protocol.states import RunState
from worker.db.session import session_scope
from worker.settings import get_settings


def _finish_open_run(engine) -> None:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        run = s.get(RotationRun, "r1")
        run.state, run.finished_at = RunState.completed, datetime.now(timezone.utc)


@pytest.fixture
def stub_broker(monkeypatch):  # type: ignore[no-untyped-def]
    from worker.runtime import broker as broker_mod

    stub = broker_mod.make_stub_broker()
    original_setup = broker_mod.setup_broker
    monkeypatch.setattr("worker.cli.act_cmds._require_redis", lambda url: None)
    monkeypatch.setattr(broker_mod, "setup_broker", lambda settings=None, broker=None: original_setup(broker=stub))
    yield stub
    broker_mod.reset_broker()


def test_wait_with_no_worker_fails_early_and_says_how_to_start_one(engine, redis_url, redis_namespace, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """Real Redis: nothing has a heartbeat in the namespace, so --wait stops at once (exit 1)."""
    _finish_open_run(engine)
    monkeypatch.setenv("KEYROTOR_REDIS_URL", redis_url)
    monkeypatch.setenv("KEYROTOR_QUEUE_NAMESPACE", redis_namespace)
    get_settings.cache_clear()
    from worker.runtime import broker as broker_mod

    try:
        code = main(["rotate", "alloy/a", "--wait"])
    finally:
        broker_mod.reset_broker()
    captured = capsys.readouterr()
    assert code == EXIT_FAILED
    errors = [line for line in captured.err.splitlines() if line.strip()]
    assert len(errors) == 1 and "no worker consumes the queue" in errors[0] and "keyrotor worker" in errors[0]
    assert "requested" in captured.out  # the run is recorded; it starts when a worker does


def test_wait_goes_on_when_a_worker_heartbeat_is_fresh(engine, redis_url, redis_namespace, redis_client, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    _finish_open_run(engine)
    monkeypatch.setenv("KEYROTOR_REDIS_URL", redis_url)
    monkeypatch.setenv("KEYROTOR_QUEUE_NAMESPACE", redis_namespace)
    get_settings.cache_clear()
    redis_client.zadd(f"{redis_namespace}:__heartbeats__", {"some-worker": int(time.time() * 1000)})
    from worker.runtime import broker as broker_mod

    try:
        code = main(["rotate", "alloy/a", "--wait", "--timeout", "1"])
    finally:
        broker_mod.reset_broker()
    captured = capsys.readouterr()
    assert code == EXIT_TIMEOUT, captured.err
    assert "no worker" not in captured.err and "timed out waiting" in captured.err
    assert "keyrotor describe" in captured.err  # how to follow the run that goes on


def test_ctrl_c_says_the_run_continues_and_exits_130(engine, stub_broker, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    _finish_open_run(engine)
    monkeypatch.setattr(act_cmds, "_worker_listening", lambda settings, own_id: True)

    def interrupted(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(act_cmds, "wait_for_runs", interrupted)
    code = main(["rotate", "alloy/a", "--wait"])
    captured = capsys.readouterr()
    assert code == EXIT_INTERRUPTED
    run_id = captured.out.split("requested ", 1)[1].split()[0]
    assert "the run goes on in the workers" in captured.err
    assert f"keyrotor describe {run_id} --watch" in captured.err and "keyrotor history alloy/a" in captured.err


def test_wait_narrates_when_the_grace_period_ends(engine, capsys) -> None:  # type: ignore[no-untyped-def]
    grace_until = datetime.now(timezone.utc) + timedelta(hours=1)
    with session_scope(engine) as s:
        run = s.get(RotationRun, "r1")
        run.state, run.grace_until = RunState.verified, grace_until
    summary = [{"run_id": "r1", "key": "alloy/a", "state": "requested", "created": True}]
    code = wait_for_runs(engine, summary, until=WaitUntil.verified, timeout=10, narrate=True, interval=0.02)
    out = capsys.readouterr().out
    assert code == EXIT_OK
    assert f"grace ends at {grace_until.strftime('%H:%M:%S')} UTC (in 59m)" in out or \
        f"grace ends at {grace_until.strftime('%H:%M:%S')} UTC (in 1h)" in out


def test_a_failed_wait_prints_the_error(engine, capsys) -> None:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        run = s.get(RotationRun, "r1")
        run.state, run.last_error = RunState.needs_attention, "revoke: {key_id} has no value"
    summary = [{"run_id": "r1", "key": "alloy/a", "state": "requested", "created": True}]
    code = wait_for_runs(engine, summary, until=WaitUntil.completed, timeout=10, narrate=True, interval=0.02)
    out = capsys.readouterr().out
    assert code == EXIT_FAILED
    assert "alloy/a: revoke: {key_id} has no value (details: `keyrotor describe r1`)" in out
    assert summary[0]["last_error"] == "revoke: {key_id} has no value"  # also in rotate --wait -o json


def test_default_timeout_covers_the_grace_period(engine) -> None:  # type: ignore[no-untyped-def]
    settings = get_settings()
    with session_scope(engine) as s:
        run = s.get(RotationRun, "r1")
        steps = settings.activation_timeout_s + STEP_ALLOWANCE_S
        assert wait_budget(s, [run], settings, until=WaitUntil.completed) == 3600 + steps  # the key's grace: 1h
        assert wait_budget(s, [run], settings, until=WaitUntil.verified) == steps
        run.emergency = True
        assert wait_budget(s, [run], settings, until=WaitUntil.completed) == steps


def test_dry_run_says_what_would_happen_and_changes_nothing(engine, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("KEYROTOR_REDIS_URL", "redis://127.0.0.1:1/0")  # not even asked
    get_settings.cache_clear()
    code = main(["rotate", "alloy/a", "--dry-run", "-o", "json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["dry_run"] is True
    (item,) = doc["keys"]
    assert item["key"] == "alloy/a" and item["provider"] == "alloy" and item["grace_period_s"] == 3600
    assert item["mode"] == "overlap" and item["open_run"] == "r1" and item["would"].startswith("join open run r1")
    _finish_open_run(engine)
    code = main(["rotate", "alloy/a", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0 and "would start a new run" in out and "grace 1h00m" in out and "nothing was recorded" in out
    with session_scope(engine) as s:
        assert len(s.exec(select(RotationRun)).all()) == 1 and s.exec(select(AuditEvent)).all() == []


def test_deposit_json_prints_the_state_value_not_the_enum(engine, stub_broker, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        s.get(RotationRun, "r1").state = RunState.awaiting_deposit
    monkeypatch.setattr("sys.stdin", io.StringIO("new-secret-value\n"))
    monkeypatch.setattr("worker.pipeline.deposit.deposit", lambda **kwargs: RunState.issued)
    code = main(["deposit", "r1", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    doc = json.loads(out)
    assert doc["state"] == "issued" and "RunState" not in out and "new-secret-value" not in out
