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

from worker.cli.common import (EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT, cli_settings, fail, open_database, operator,
                               operator_at_host)
from worker.cli.follow import STOP_STATES, AuditFollower, run_states, state_of
from worker.cli.output import print_json
from worker.db.models import ManagedKey, RunState
from worker.db.session import session_scope
from worker.errors import PermanentError, StateConflict
from worker.secret import Secret


class WaitUntil(str, Enum):
    completed = "completed"   # the old key is retired (after the grace period)
    verified = "verified"     # the new key is served and verified; retirement follows the grace period


_SUCCESS = {
    WaitUntil.completed: {RunState.completed.value},
    WaitUntil.verified: {RunState.verified.value, RunState.retired.value, RunState.completed.value},
}


def rotate(
    key: Optional[str] = typer.Argument(None, help="Managed key to rotate (omit with --provider P --all)."),
    reason: str = typer.Option("manual", "--reason", help="Why (recorded in the audit trail)."),
    wait: bool = typer.Option(False, "--wait", help="Follow the run until it ends; exit 1 if it did not succeed."),
    until: WaitUntil = typer.Option(WaitUntil.completed, "--until", help="With --wait: stop at this state."),
    timeout: float = typer.Option(900.0, "--timeout", min=1, help="With --wait: give up after this many seconds (exit 3)."),
    provider: Optional[str] = typer.Option(None, "--provider", help="With --all: the provider whose keys to rotate."),
    all_keys: bool = typer.Option(False, "--all", help="Every enabled key of --provider."),
    emergency: bool = typer.Option(False, "--emergency", help="No grace period: revoke old keys as soon as the new ones verify."),
    idempotency_key: Optional[str] = typer.Option(None, "--idempotency-key", help="Same value → same run (safe to repeat)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document; no narration."),
) -> None:
    """Request a rotation now (and optionally wait for it)."""
    if all_keys or provider:
        if key:
            fail("give either KEY or --provider P --all, not both")
        if not (provider and all_keys):
            fail("rotating a whole provider needs both --provider P and --all")
        if not emergency:
            fail("--provider P --all rotates every key with no grace period; add --emergency to confirm")
    elif not key:
        fail("which key? give KEY, or --provider P --all --emergency; see `keyrotor status`")

    settings = cli_settings()
    engine = open_database(settings)
    _require_redis(settings.redis_url)
    from worker.pipeline.broker import setup_broker

    setup_broker(settings)
    from worker.pipeline.requests import enqueue_run, request_rotation

    requested_by = operator()
    with session_scope(engine) as session:
        if key:
            managed = session.exec(_key_query(key)).first()
            if managed is None:
                fail(f"no managed key named {key!r}; see `keyrotor status`")
            blocker = _rotation_blocker(session, managed, settings)
            if blocker is not None:
                fail(blocker)
            run, created = request_rotation(
                session, key_name=key, reason=reason, trigger="emergency" if emergency else "manual",
                requested_by=requested_by, idempotency_key=idempotency_key, emergency=emergency)
            runs = [(run, created)]
        else:
            from jobs.emergency import request_provider_rotation

            provider_runs = request_provider_rotation(session, provider=provider or "", requested_by=requested_by,
                                                      reason=reason if reason != "manual" else "breach")
            if not provider_runs:
                fail(f"provider {provider!r} has no enabled keys; see `keyrotor status`")
            runs = provider_runs
        names = _key_names(session, [r.key_id for r, _ in runs])
        summary = [{"run_id": r.id, "key": names.get(r.key_id), "state": state_of(r), "created": c} for r, c in runs]
    for run, created in runs:
        if created:  # a joined run is already on its way; the reconciler re-enqueues stuck ones
            enqueue_run(run)

    if not json_out:
        for item in summary:
            verb = "requested" if item["created"] else "joined open run"
            typer.echo(f"{item['key']}: {verb} {item['run_id']} ({item['state']})")
    if not wait:
        # An emergency never leaves a key quietly alone: a run it could not take over is reported.
        stuck = [i for i in summary if emergency and i["state"] in _WAITING]
        _report_not_rotated(stuck, json_out)
        if json_out:
            print_json({"runs": summary, "not_rotated": stuck})
        if stuck:
            raise typer.Exit(EXIT_FAILED)
        return
    code = _wait(engine, summary, until=until, timeout=timeout, narrate=not json_out)
    failed = [i for i in summary if i["state"] not in _SUCCESS[until]] if code != EXIT_OK else []
    if emergency:
        _report_not_rotated(failed, json_out)
    if json_out:
        print_json({"runs": summary, "exit_code": code, **({"not_rotated": failed} if emergency else {})})
    raise typer.Exit(code)


_WAITING = {RunState.needs_attention.value, RunState.awaiting_deposit.value}


def _report_not_rotated(items: list[dict[str, Any]], json_out: bool) -> None:
    """One stderr line per key an emergency did not rotate (it keeps the exposed credential)."""
    if json_out:
        return
    for item in items:
        typer.echo(f"keyrotor: not rotated: {item['key']}: run {item['run_id']} is {item['state']}; the exposed "
                   f"credential is still in use (see `keyrotor history {item['key']}`, `keyrotor resolve {item['run_id']}`)",
                   err=True)
    if items:
        typer.echo(f"keyrotor: emergency incomplete: {len(items)} key{'s' if len(items) != 1 else ''} not rotated", err=True)


def _wait(engine: Any, summary: list[dict[str, Any]], *, until: WaitUntil, timeout: float, narrate: bool,
          interval: float = 0.5) -> int:
    """Poll until every run is in a stop state (or ``until`` reached); narrate state changes."""
    ids = {item["run_id"] for item in summary}
    follower = AuditFollower(engine, run_ids=ids)
    deadline = time.monotonic() + timeout
    while True:
        # States first, then the audit trail: a state change and its audit event commit together,
        # so every state read here has its event in the poll below (the last change is never
        # missed from the narration when it lands between the two reads).
        states = {rid: state_of(r) for rid, r in run_states(engine, ids).items()}
        for change in follower.poll():
            if narrate and (change.from_state or change.to_state or change.event != "state_changed"):
                typer.echo(change.line())
        for item in summary:
            item["state"] = states.get(item["run_id"], item["state"])
        done = [s in STOP_STATES or s in _SUCCESS[until] for s in states.values()]
        if states and all(done):
            ok = all(s in _SUCCESS[until] for s in states.values())
            if narrate:
                typer.echo("done: " + ", ".join(f"{i['key']} {i['state']}" for i in summary))
            return EXIT_OK if ok else EXIT_FAILED
        if time.monotonic() >= deadline:
            if narrate:
                typer.echo("timed out waiting: " + ", ".join(f"{i['key']} {i['state']}" for i in summary), err=True)
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


def _key_query(name: str):  # type: ignore[no-untyped-def]
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
                                 help="The run waiting for a deposit, or its key's name (see `keyrotor runs --state awaiting_deposit`)."),
    as_name: Optional[str] = typer.Option(None, "--as", help="Who created the credential (recorded in the audit trail "
                                          "next to the OS user and host); owners deposit through Vault instead."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Assisted mode (operators): hand over the new credential for a run (stdin or a hidden prompt).

    The credential is checked at the provider first; one that does not work is refused (exit 1)
    and the run keeps waiting."""
    settings = cli_settings()
    engine = open_database(settings)
    with session_scope(engine) as session:
        run = find_awaiting_run(session, target)
        run_id, key_name = run.id, _key_names(session, [run.key_id]).get(run.key_id, "?")
    secret = read_deposit_secret(f"New credential for {key_name} (input hidden): ")
    _require_redis(settings.redis_url)
    from worker.pipeline.broker import setup_broker

    setup_broker(settings)
    from worker.pipeline.deposit import DepositRejected
    from worker.pipeline.deposit import deposit as pipeline_deposit

    actor = operator_at_host() + (f" as {as_name.strip()[:100]}" if as_name and as_name.strip() else "")
    try:
        result = pipeline_deposit(run_id=run_id, secret=secret, deposited_by=actor,
                                  detail={"source": "cli", "claimed_by": as_name})
    except DepositRejected as exc:
        fail(f"{key_name}: not deposited: {exc}; run {run_id} still awaits a deposit", EXIT_FAILED)
    doc = {"run_id": run_id, "key": key_name, "fingerprint": secret.fingerprint, "result": str(result) if result is not None else None}
    if json_out:
        print_json(doc)
    else:
        typer.echo(f"{key_name}: deposited credential {secret.fingerprint} for run {run_id}; it works at the provider "
                   "and the run continues")
    raise typer.Exit(EXIT_OK)


def find_awaiting_run(session: Any, target: str) -> Any:
    """The run named ``target``, or the open run of the key named ``target``; it must await a deposit."""
    from sqlmodel import select

    from worker.db.models import RotationRun

    run = session.get(RotationRun, target)
    if run is None:
        key = session.exec(_key_query(target)).first()
        if key is None:
            fail(f"no run or key {target!r}; see `keyrotor runs --state awaiting_deposit`")
        run = session.exec(select(RotationRun).where(RotationRun.key_id == key.id,
                                                     RotationRun.finished_at.is_(None))).first()  # type: ignore[union-attr]
        if run is None:
            fail(f"key {target} has no open run; request one with `keyrotor rotate {target}`")
    if state_of(run) != RunState.awaiting_deposit.value:
        fail(f"run {run.id} is {state_of(run)}, not awaiting_deposit; nothing to deposit")
    return run


def resolve(
    run_id: str = typer.Argument(..., help="A run in needs_attention (see `keyrotor runs --state needs_attention`)."),
    action: Optional[str] = typer.Option(
        None, "--action",
        help="retry | compensate | rollback | cancel | revoked-by-person. Omit to list what this run allows."),
    note: Optional[str] = typer.Option(None, "--note", help="Why (recorded in the audit trail)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Resolve a run that needs attention: retry it, compensate, roll back, cancel it, or record that a
    person revoked the old key (revoked-by-person)."""
    from worker.pipeline.resolve import allowed_actions, resolve_run

    settings = cli_settings()
    engine = open_database(settings)
    if action is None:
        with session_scope(engine) as session:
            options = allowed_actions(session, run_id)
        if json_out:
            print_json({"run_id": run_id, "allowed": options})
        elif not options:
            typer.echo(f"run {run_id} does not need attention (or does not exist); nothing to resolve")
        else:
            for name, target in options.items():
                typer.echo(f"{name:<11} → {target}")
        raise typer.Exit(EXIT_OK if options else EXIT_FAILED)
    _require_redis(settings.redis_url)
    from worker.pipeline.broker import setup_broker

    setup_broker(settings)
    try:
        with session_scope(engine) as session:
            run = resolve_run(session, run_id, action, actor=operator(), note=note)
            state = state_of(run)
    except PermanentError as exc:  # refused: the message names the allowed actions
        fail(str(exc))
    except StateConflict as exc:  # someone (a worker, another operator) moved the run meanwhile
        fail(f"run {run_id} changed while resolving it ({exc}); look again with `keyrotor history`", EXIT_FAILED)
    if json_out:
        print_json({"run_id": run_id, "action": action, "state": state})
    else:
        typer.echo(f"run {run_id}: {action} → {state}")
    raise typer.Exit(EXIT_OK)


def register(app: typer.Typer) -> None:
    app.command("rotate")(rotate)
    app.command("deposit")(deposit)
    app.command("resolve")(resolve)
