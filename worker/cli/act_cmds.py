"""Commands that act through the pipeline: ``rotate`` (one key, or every key of a provider in an
emergency) and ``deposit`` (assisted mode: hand over a value a person created in a vendor's UI).

The CLI is just another producer: it records the request in the database (idempotently, one open
run per key) and enqueues the run's first step; the workers do the rest.
"""

from __future__ import annotations

import getpass
import sys
import time
from enum import Enum
from typing import Any, Optional

import typer
from sqlalchemy import String
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.types import TypeDecorator
from sqlmodel import col

from worker.cli.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TIMEOUT,
    cli_settings,
    fail,
    find_key,
    find_run,
    open_database,
    operator,
    operator_at_host,
)
from worker.cli.follow import STOP_STATES, AuditFollower, run_states, state_of
from worker.cli.output import OutputFormat, duration, emit, json_option, output_option, pick_format, relative
from worker.db.models import ManagedKey, RotationRun
from worker.protocol.states import RunState
from worker.db.session import session_scope
from worker.errors import PermanentError, StateConflict
from worker.pipeline.targets import UnknownTargetType
from worker.secret import Secret
from worker.text import count
from worker.urls import display_url

# Commands import the service modules they use inside the command function, not here:
# `keyrotor --help` and each command start without importing the whole service (start-up cost).

#: Column limits, checked before anything is recorded (PostgreSQL would refuse a longer value).
def _column_length(name: str) -> int:
    column_type = sa_inspect(RotationRun).columns[name].type
    if isinstance(column_type, TypeDecorator):  # sqlmodel's AutoString wraps a String
        column_type = column_type.impl_instance
    if not isinstance(column_type, String) or column_type.length is None:
        raise TypeError(f"rotation_run.{name} is not a bounded string column")
    return column_type.length


REASON_MAX = _column_length("reason")
IDEMPOTENCY_KEY_MAX = _column_length("idempotency_key")


class WaitUntil(str, Enum):
    completed = "completed"   # the old key is retired (after the grace period)
    verified = "verified"     # the new key is served and verified; retirement follows the grace period


_SUCCESS = {
    WaitUntil.completed: {RunState.completed.value},
    WaitUntil.verified: {RunState.verified.value, RunState.retired.value, RunState.completed.value},
}


def rotate(
    key: Optional[str] = typer.Argument(None, help="Managed key to rotate (omit with --provider P --all)."),
    reason: str = typer.Option("manual", "--reason", help=f"Why (recorded in the audit trail; at most {REASON_MAX} characters)."),
    wait: bool = typer.Option(False, "--wait", help="Follow the run until it ends, narrating each change; exit 1 if it did not succeed."),
    until: WaitUntil = typer.Option(WaitUntil.completed, "--until", help="With --wait: stop at this state."),
    timeout: Optional[float] = typer.Option(
        None, "--timeout", min=1,
        help="With --wait: give up after this many seconds (exit 3). Default: the key's grace period plus time for the steps."),
    provider: Optional[str] = typer.Option(None, "--provider", help="With --all: the provider whose keys to rotate."),
    all_keys: bool = typer.Option(False, "--all", help="Every enabled key of --provider."),
    emergency: bool = typer.Option(False, "--emergency", help="No grace period: revoke old keys as soon as the new ones verify."),
    to: Optional[str] = typer.Option(
        None, "--to", metavar="TYPE",
        help="Issue this credential type (one the provider declares) instead of the key's own; "
             "without it a deprecated type moves to its replacement by itself."),
    idempotency_key: Optional[str] = typer.Option(
        None, "--idempotency-key", help=f"Same value → same run (safe to repeat; at most {IDEMPOTENCY_KEY_MAX} characters)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would happen (key, provider, mode, grace); change nothing."),
    output: Optional[OutputFormat] = output_option(),
    json_out: bool = json_option(),
) -> None:
    """Request a rotation now (and optionally wait for it)."""
    if all_keys or provider:
        if key:
            fail("give either KEY or --provider P --all, not both")
        if not (provider and all_keys):
            fail("rotating a whole provider needs both --provider P and --all")
        if not emergency:
            fail("--provider P --all rotates every key with no grace period; add --emergency to confirm")
        if to is not None:
            fail("--to names the credential type of one key: give KEY, not --provider P --all")
    elif not key:
        fail("which key? give KEY, or --provider P --all --emergency; see `keyrotor status`")
    if len(reason) > REASON_MAX:
        fail(f"--reason is {len(reason)} characters; at most {REASON_MAX} (put the long story in the ticket it names)")
    if idempotency_key is not None and len(idempotency_key) > IDEMPOTENCY_KEY_MAX:
        fail(f"--idempotency-key is {len(idempotency_key)} characters; at most {IDEMPOTENCY_KEY_MAX}")
    fmt = pick_format(output, json_out)
    machine = fmt in (OutputFormat.json, OutputFormat.yaml)

    settings = cli_settings()
    if dry_run:
        _dry_run(settings, key=key, provider=provider, emergency=emergency, fmt=fmt, to=to)
        return
    engine = open_database(settings)
    _require_redis(settings.redis_url)
    from worker.runtime.broker import setup_broker

    broker = setup_broker(settings)
    from worker.pipeline.outbox import enqueue_run
    from worker.pipeline.requests import request_rotation
    from worker.queues import batched_sends

    requested_by = operator()
    with session_scope(engine) as session:
        if key:
            managed = session.exec(_key_query(key)).first()
            if managed is None:
                fail(f"no managed key named {key!r}; see `keyrotor status`")
            blocker = _rotation_blocker(session, managed, settings)
            if blocker is not None:
                fail(blocker)
            try:
                run, created = request_rotation(
                    session, key_name=key, reason=reason, trigger="emergency" if emergency else "manual",
                    requested_by=requested_by, idempotency_key=idempotency_key, emergency=emergency,
                    target_credential_type=to)
            except UnknownTargetType as exc:
                fail(f"--to {to}: {exc}")
            runs = [(run, created)]
        else:
            from worker.service.emergency import request_provider_rotation

            provider_runs = request_provider_rotation(session, provider=provider or "", requested_by=requested_by,
                                                      reason=reason if reason != "manual" else "breach")
            if not provider_runs:
                fail(f"provider {provider!r} has no enabled keys; see `keyrotor status`")
            runs = provider_runs
        names = _key_names(session, [r.key_id for r, _ in runs])
        summary = [{"run_id": r.id, "key": names.get(r.key_id), "state": state_of(r), "created": c,
                    "last_error": r.last_error} for r, c in runs]
        budget = timeout if timeout is not None else wait_budget(session, [r for r, _ in runs], settings, until=until)
    # An emergency's first steps go to Redis together (one round trip for hundreds of runs); a
    # failed send is logged, and the reconciler re-enqueues a recorded run whose message was lost.
    with batched_sends():
        for run, created in runs:
            if created:  # a joined run is already on its way; the reconciler re-enqueues stuck ones
                enqueue_run(run)

    if not machine:
        for item in summary:
            verb = "requested" if item["created"] else "joined open run"
            typer.echo(f"{item['key']}: {verb} {item['run_id']} ({item['state']})")
    if not wait:
        # An emergency never leaves a key quietly alone: a run it could not take over is reported.
        stuck = [i for i in summary if emergency and i["state"] in _WAITING]
        _report_not_rotated(stuck, machine)
        if machine:
            emit({"runs": summary, "not_rotated": stuck}, fmt)
        if stuck:
            raise typer.Exit(EXIT_FAILED)
        return
    hint = _follow_hint(summary)
    if not _worker_listening(settings, getattr(broker, "broker_id", None)):
        message = (f"no worker consumes the queue {settings.queue_namespace!r} at {display_url(settings.redis_url)} "
                   f"(no worker heartbeat in the last {settings.broker_heartbeat_timeout_s:g}s); start one with "
                   f"`keyrotor worker`; the run is recorded and starts when a worker does ({hint})")
        if machine:
            emit({"runs": summary, "exit_code": EXIT_FAILED, "error": message}, fmt)
        fail(message, EXIT_FAILED)
    if not machine:
        typer.echo(f"waiting up to {duration(budget)} (--timeout to change); Ctrl-C stops waiting, not the run")
    try:
        code = wait_for_runs(engine, summary, until=until, timeout=budget, narrate=not machine)
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted: the run goes on in the workers; {hint}", err=True)
        if machine:
            emit({"runs": summary, "exit_code": EXIT_INTERRUPTED, "error": "interrupted"}, fmt)
        raise typer.Exit(EXIT_INTERRUPTED)
    failed = [i for i in summary if i["state"] not in _SUCCESS[until]] if code != EXIT_OK else []
    if emergency:
        _report_not_rotated(failed, machine)
    if machine:
        error = None
        if code == EXIT_TIMEOUT:
            error = f"timed out after {duration(budget)}"
        elif code != EXIT_OK:
            error = "; ".join(f"{i['key']}: {i['state']}" + (f": {i['last_error']}" if i["last_error"] else "") for i in failed)
        emit({"runs": summary, "exit_code": code, "error": error, **({"not_rotated": failed} if emergency else {})}, fmt)
    raise typer.Exit(code)


_WAITING = {RunState.needs_attention.value, RunState.awaiting_deposit.value}

#: Room for the steps besides the grace period and the key's activation wait (issue, propagate,
#: verify, revoke, each with retries) in the default ``--wait`` timeout.
STEP_ALLOWANCE_S = 600.0


def wait_budget(session: Any, runs: list[Any], settings: Any, *, until: WaitUntil) -> float:
    """The default ``--wait`` timeout: the longest grace period among the runs' keys (none for an
    emergency or ``--until verified``), the activation wait, and an allowance for the steps."""
    from worker.db.models import ManagedKey

    grace = 0.0
    if until is WaitUntil.completed:
        for run in runs:
            key = session.get(ManagedKey, run.key_id)
            if key is not None and not run.emergency:
                grace = max(grace, float(key.grace_period_s))
    return grace + float(settings.activation_timeout_s) + STEP_ALLOWANCE_S


def _follow_hint(summary: list[dict[str, Any]]) -> str:
    if len(summary) == 1:
        item = summary[0]
        return f"follow it with `keyrotor describe {item['run_id']} --watch` or `keyrotor history {item['key']}`"
    return "follow them with `keyrotor runs --state open` and `keyrotor describe RUN --watch`"


def _worker_listening(settings: Any, own_id: str | None, settle_s: float = 3.0) -> bool:
    """Does any worker consume the queue? Asked of Dramatiq's heartbeats; a worker that is just
    starting gets ``settle_s`` to show up. When Redis cannot say, assume yes (then wait as asked)."""
    import redis

    from worker.pipeline.consumers import live_consumers
    from worker.redis_conn import redis_client

    client = redis_client(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
    deadline = time.monotonic() + settle_s
    try:
        while True:
            if live_consumers(client, settings.queue_namespace, within_s=settings.broker_heartbeat_timeout_s,
                              exclude=[own_id] if own_id else []):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)
    except redis.RedisError:
        return True
    finally:
        client.close()


def _dry_run(settings: Any, *, key: str | None, provider: str | None, emergency: bool, fmt: OutputFormat,
             to: str | None = None) -> None:
    """What ``rotate`` would do: which keys, at which provider, in which mode, with what grace."""
    from sqlmodel import col, select

    from worker.clock import utcnow
    from worker.db.models import ProviderRecord, RotationRun
    from worker.pipeline.targets import rotation_target
    from worker.protocol import parse_mode

    engine = open_database(settings, read_only=True)
    plan: list[dict[str, Any]] = []
    with session_scope(engine) as session:
        if key:
            keys = [find_key(session, key)]
        else:
            keys = list(session.exec(select(ManagedKey).where(ManagedKey.provider == provider, col(ManagedKey.enabled).is_(True))
                                     .order_by(col(ManagedKey.name))).all())
            if not keys:
                fail(f"provider {provider!r} has no enabled keys; see `keyrotor status`")
        for k in keys:
            record = session.get(ProviderRecord, k.provider)
            open_run = session.exec(select(RotationRun).where(RotationRun.key_id == k.id,
                                                              col(RotationRun.finished_at).is_(None))).first()
            if not k.enabled:
                action = "refused: the key is disabled in the inventory"
            elif open_run is not None:
                action = f"join open run {open_run.id} ({state_of(open_run)})"
            else:
                action = "start a new run"
            try:
                target = rotation_target(provider=k.provider, provider_spec=record.spec if record else None,
                                         current_type=k.credential_type, requested=to, now=utcnow()) or k.credential_type
            except UnknownTargetType as exc:
                fail(f"--to {to}: {exc}")
            plan.append({
                "key": k.name, "provider": k.provider, "credential_type": k.credential_type, "target_credential_type": target,
                "mode": parse_mode(record.mode if record else None).value,
                "grace_period_s": 0 if emergency else k.grace_period_s, "emergency": emergency,
                "vault": f"{k.vault_mount}/{k.vault_path}#{k.vault_field}",
                "open_run": open_run.id if open_run is not None else None, "would": action,
            })
    if fmt in (OutputFormat.json, OutputFormat.yaml):
        emit({"dry_run": True, "keys": plan}, fmt)
        return
    for item in plan:
        grace = "none (emergency)" if emergency else duration(item["grace_period_s"])
        typer.echo(f"{item['key']}: would {item['would']} — provider {item['provider']}, mode {item['mode']}, "
                   f"type {_type_change(item)}, grace {grace}, vault {item['vault']}")
    typer.echo("dry run: nothing was recorded or queued")


def _type_change(item: dict[str, Any]) -> str:
    old, new = item["credential_type"], item["target_credential_type"]
    return old if old == new else f"{old} → {new}"


def _report_not_rotated(items: list[dict[str, Any]], json_out: bool) -> None:
    """One stderr line per key an emergency did not rotate (it keeps the exposed credential)."""
    if json_out:
        return
    for item in items:
        typer.echo(f"keyrotor: not rotated: {item['key']}: run {item['run_id']} is {item['state']}; the exposed "
                   f"credential is still in use (see `keyrotor history {item['key']}`, `keyrotor resolve {item['run_id']}`)",
                   err=True)
    if items:
        typer.echo(f"keyrotor: emergency incomplete: {count(len(items), 'key')} not rotated", err=True)


#: How often ``--wait`` repeats the grace countdown while a run waits out its grace period.
COUNTDOWN_EVERY_S = 300.0


def wait_for_runs(engine: Any, summary: list[dict[str, Any]], *, until: WaitUntil, timeout: float, narrate: bool,
          interval: float = 0.5, countdown_every: float = COUNTDOWN_EVERY_S) -> int:
    """Poll until every run is in a stop state (or ``until`` reached); narrate state changes and,
    while a run is in its grace period, when the grace ends."""
    ids = {item["run_id"] for item in summary}
    names = {item["run_id"]: item["key"] for item in summary}
    follower = AuditFollower(engine, run_ids=ids)
    deadline = time.monotonic() + timeout
    countdown_at: dict[str, float] = {}
    while True:
        # States first, then the audit trail: a state change and its audit event commit together,
        # so every state read here has its event in the poll below (the last change is never
        # missed from the narration when it lands between the two reads).
        rows = run_states(engine, ids)
        states = {rid: state_of(r) for rid, r in rows.items()}
        for change in follower.poll():
            if narrate and (change.from_state or change.to_state or change.event != "state_changed"):
                typer.echo(change.line())
        for item in summary:
            item["state"] = states.get(item["run_id"], item["state"])
            row = rows.get(item["run_id"])
            item["last_error"] = row.last_error if row is not None else item.get("last_error")
        if narrate:
            for rid, row in rows.items():
                line = grace_line(names.get(rid) or "-", row, countdown_at, countdown_every)
                if line:
                    typer.echo(line)
        done = [s in STOP_STATES or s in _SUCCESS[until] for s in states.values()]
        if states and all(done):
            ok = all(s in _SUCCESS[until] for s in states.values())
            if narrate:
                typer.echo("done: " + ", ".join(f"{i['key']} {i['state']}" for i in summary))
                for i in summary:
                    if i["state"] not in _SUCCESS[until] and i.get("last_error"):
                        typer.echo(f"{i['key']}: {i['last_error']} (details: `keyrotor describe {i['run_id']}`)")
            return EXIT_OK if ok else EXIT_FAILED
        if time.monotonic() >= deadline:
            if narrate:
                typer.echo("timed out waiting: " + ", ".join(f"{i['key']} {i['state']}" for i in summary)
                           + f"; the run goes on in the workers; {_follow_hint(summary)}", err=True)
            return EXIT_TIMEOUT
        time.sleep(interval)


def _rotation_blocker(session: Any, key: ManagedKey, settings: Any) -> Optional[str]:
    """Why this key cannot be rotated yet (its current key could never be revoked), if Vault can
    tell now; an unreachable Vault is left to the issue step, which checks the same."""
    from worker.adoption import rotation_blocker
    from worker.errors import KeyrotorError
    from worker.vault.store import VaultStore

    try:
        return rotation_blocker(session, key, VaultStore.from_settings(settings))
    except KeyrotorError:
        return None


def grace_line(key: str, run: Any, shown: dict[str, float], every: float) -> str | None:
    """``alloy/reporting  grace ends at 14:05:00 UTC (in 59m); the old key is revoked then`` — on
    entering the grace period and every ``every`` seconds after, while the run is verified."""
    from worker.clock import as_utc, utcnow

    grace_until = as_utc(run.grace_until)
    if state_of(run) != RunState.verified.value or grace_until is None:
        return None
    last = shown.get(run.id)
    if last is not None and time.monotonic() - last < every:
        return None
    shown[run.id] = time.monotonic()
    return (f"{utcnow().strftime('%H:%M:%S')}  {key:<16} grace ends at {grace_until.strftime('%H:%M:%S')} UTC "
            f"({relative(grace_until)}); the old key is revoked then")


def _key_query(name: str):
    from sqlmodel import select

    return select(ManagedKey).where(ManagedKey.name == name)


def _key_names(session: Any, key_ids: list[int]) -> dict[int, str]:
    from sqlmodel import col, select

    rows = session.exec(select(ManagedKey).where(col(ManagedKey.id).in_(key_ids))).all()
    return {k.id: k.name for k in rows}


def _redis_answers(url: str) -> bool:
    from worker.cli.common import redis_reachable

    return redis_reachable(url, timeout=2.0)


def _require_redis(url: str) -> None:
    """Fail before recording anything when the queue cannot be reached (exit 1, not a traceback)."""
    from worker.cli.common import require_redis

    require_redis(url, ", so the run could not be queued")


def read_deposit_secret(prompt: str) -> Secret:
    """The new value from stdin (piped) or a prompt with no echo — never from argv (``ps`` shows it)."""
    if sys.stdin is not None and not sys.stdin.isatty():
        value = sys.stdin.read().strip()
    else:
        value = getpass.getpass(prompt).strip()
    if not value:
        fail("no secret given: pipe it on stdin or type it at the prompt")
    return Secret(value)


def deposit(
    target: str = typer.Argument(..., metavar="RUN|KEY",
                                 help="The run waiting for a deposit (or an unambiguous prefix of its id), or its "
                                      "key's name (see `keyrotor runs --state awaiting_deposit`)."),
    as_name: Optional[str] = typer.Option(None, "--as", help="Who created the credential (recorded in the audit trail "
                                          "next to the OS user and host); owners deposit through Vault instead."),
    output: Optional[OutputFormat] = output_option(),
    json_out: bool = json_option(),
) -> None:
    """Assisted mode (operators): hand over the new credential for a run (stdin or a hidden prompt).

    The credential is checked at the provider first; one that does not work is refused (exit 1)
    and the run keeps waiting."""
    fmt = pick_format(output, json_out)
    settings = cli_settings()
    engine = open_database(settings, read_only=True)
    with session_scope(engine) as session:
        run = find_awaiting_run(session, target)
        run_id, key_name = run.id, _key_names(session, [run.key_id]).get(run.key_id, "?")
    secret = read_deposit_secret(f"New credential for {key_name} (input hidden): ")
    _require_redis(settings.redis_url)
    from worker.runtime.broker import setup_broker

    setup_broker(settings)
    from worker.pipeline.deposit import DepositRejected
    from worker.pipeline.deposit import deposit as pipeline_deposit

    actor = operator_at_host() + (f" as {as_name.strip()[:100]}" if as_name and as_name.strip() else "")
    try:
        result = pipeline_deposit(run_id=run_id, secret=secret, deposited_by=actor,
                                  detail={"source": "cli", "claimed_by": as_name})
    except DepositRejected as exc:
        fail(f"{key_name}: not deposited: {exc}; run {run_id} still awaits a deposit", EXIT_FAILED)
    state = result.value if isinstance(result, Enum) else result
    doc = {"run_id": run_id, "key": key_name, "fingerprint": secret.fingerprint, "state": state}
    if fmt in (OutputFormat.json, OutputFormat.yaml):
        emit(doc, fmt)
    else:
        typer.echo(f"{key_name}: deposited credential {secret.fingerprint} for run {run_id}; it works at the provider "
                   f"and the run continues ({state})")
    raise typer.Exit(EXIT_OK)


def find_awaiting_run(session: Any, target: str) -> Any:
    """The run named ``target``, or the open run of the key named ``target``; it must await a deposit."""
    from sqlmodel import select

    from worker.db.models import RotationRun

    run = session.get(RotationRun, target)
    if run is None:
        key = session.exec(_key_query(target)).first()
        if key is None:
            run = find_run(session, target,  # a run-id prefix; unknown or ambiguous: one line, exit 2
                           missing=f"no run or key {target!r}; see `keyrotor runs --state awaiting_deposit`")
        else:
            run = session.exec(select(RotationRun).where(RotationRun.key_id == key.id,
                                                         col(RotationRun.finished_at).is_(None))).first()
            if run is None:
                fail(f"key {target} has no open run; request one with `keyrotor rotate {target}`")
    if state_of(run) != RunState.awaiting_deposit.value:
        fail(f"run {run.id} is {state_of(run)}, not awaiting_deposit; nothing to deposit")
    return run


def resolve(
    run_id: str = typer.Argument(..., help="A run in needs_attention, or an unambiguous prefix of its id."),
    action: Optional[str] = typer.Option(
        None, "--action",
        help="retry | compensate | rollback | cancel | revoked-by-person. Omit to list what this run allows."),
    note: Optional[str] = typer.Option(None, "--note", help="Why (recorded in the audit trail)."),
    output: Optional[OutputFormat] = output_option(),
    json_out: bool = json_option(),
) -> None:
    """Resolve a run that needs attention: retry it, compensate, roll back, cancel it, or record that a
    person revoked the old key (revoked-by-person).

    An unknown run is a usage error (exit 2) with or without --action; a run that needs no
    attention exits 1 (nothing to resolve)."""
    from worker.pipeline.resolve import allowed_actions, resolve_run

    fmt = pick_format(output, json_out)
    machine = fmt in (OutputFormat.json, OutputFormat.yaml)
    settings = cli_settings()
    engine = open_database(settings, read_only=True)
    with session_scope(engine) as session:
        run = find_run(session, run_id)
        run_id = run.id
        current = state_of(run)
    if action is None:
        with session_scope(engine) as session:
            options = allowed_actions(session, run_id)
        if machine:
            emit({"run_id": run_id, "state": current, "allowed": options}, fmt)
        elif not options:
            typer.echo(f"run {run_id} is {current}: it does not need attention; nothing to resolve")
        else:
            for name, target in options.items():
                typer.echo(f"{name:<11} → {target}")
        raise typer.Exit(EXIT_OK if options else EXIT_FAILED)
    _require_redis(settings.redis_url)
    from worker.runtime.broker import setup_broker

    setup_broker(settings)
    try:
        with session_scope(engine) as session:
            run = resolve_run(session, run_id, action, actor=operator(), note=note)
            state = state_of(run)
    except PermanentError as exc:  # refused: the message names the allowed actions
        fail(str(exc))
    except StateConflict as exc:  # someone (a worker, another operator) moved the run meanwhile
        fail(f"run {run_id} changed while resolving it ({exc}); look again with `keyrotor history`", EXIT_FAILED)
    if machine:
        emit({"run_id": run_id, "action": action, "state": state}, fmt)
    else:
        typer.echo(f"run {run_id}: {action} → {state}")
    raise typer.Exit(EXIT_OK)


def cancel(
    run_id: str = typer.Argument(..., help="A run in needs_attention or awaiting_deposit, or a prefix of its id."),
    note: Optional[str] = typer.Option(None, "--note", help="Why (recorded in the audit trail)."),
    output: Optional[OutputFormat] = output_option(),
    json_out: bool = json_option(),
) -> None:
    """Cancel a run that waits for a person (same as `resolve RUN --action cancel`)."""
    resolve(run_id=run_id, action="cancel", note=note, output=output, json_out=json_out)


def register(app: typer.Typer) -> None:
    app.command("rotate")(rotate)
    app.command("deposit")(deposit)
    app.command("resolve")(resolve)
    app.command("cancel")(cancel)
