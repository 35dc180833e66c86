"""`keyrotor demo`: apply an inventory, rotate keys end to end (one of them made to fail
verification and rolled back), narrate each state change as it happens, print a summary, and
check the invariants from outside. Exit 0 only if every check held.
"""

from __future__ import annotations

import signal
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Optional, TextIO

from sqlmodel import col, select

from worker.cli.follow import STOP_STATES, AuditFollower, state_of
from worker.cli.output import duration, print_json, print_table, short_fp
from worker.db.models import AuditEvent, KeyVersion, ManagedKey, RotationRun
from worker.db.session import session_scope
from keyrotor_sandbox.demo import invariants
from keyrotor_sandbox.demo.environment import DemoEnvironment
from worker.secret import Secret
from worker.cli.views import run_duration_s
from worker.inventory.apply import apply_inventory
from worker.inventory.loader import load_inventory
from worker.pipeline.outbox import enqueue_run
from worker.pipeline.requests import request_rotation
from worker.service.retirement import retire_due

GRACE_S = 2
#: The key whose consumer is made to keep serving the old key, so verification fails after promotion.
FAULTY_KEY = "demo/search"
FAULTY_INTEGRATION = "search-consumer"
CONSUMER_OF = {"demo/reporting": "reporting-consumer", "demo/search": "search-consumer"}
TIMEOUT_S = 45.0


@dataclass
class Narrator:
    """Writes one line per event on ``out`` (silent in --json mode) and keeps a transcript."""

    out: TextIO
    quiet: bool
    t0: float = field(default_factory=time.monotonic)
    transcript: list[str] = field(default_factory=list)

    def say(self, text: str) -> None:
        line = f"[{time.monotonic() - self.t0:5.1f}s] {text}"
        self.transcript.append(line)
        if not self.quiet:
            self.out.write(line + "\n")
            self.out.flush()


def render_inventory(env: DemoEnvironment) -> str:
    """The embedded inventory with the stand-ins' addresses filled in (``<<name>>`` placeholders)."""
    template = resources.files("keyrotor_sandbox.demo").joinpath("inventory.yaml").read_text(encoding="utf-8")
    values = {
        "provider_url": env.provider.url, "vault_mount": env.vault_mount, "grace_period": str(GRACE_S),
        "reporting_consumer_url": env.consumers["reporting-consumer"].url,
        "search_consumer_url": env.consumers["search-consumer"].url,
    }
    text = re.sub(r"<<(\w+)>>", lambda m: values[m.group(1)], template)
    return text


def apply_demo_inventory(env: DemoEnvironment, text: str) -> list[str]:
    path = env.workdir / "inventory.yaml"
    path.write_text(text, encoding="utf-8")
    inventory = load_inventory(path)
    with session_scope(env.engine) as session:
        apply_inventory(session, inventory)
    return sorted(inventory.keys)


def seed_key(env: DemoEnvironment, key: ManagedKey) -> str:
    """Create the key's first credential at the provider and store it in Vault (as if adopted)."""
    seeded = env.provider.seed_key(f"seed-{key.name.replace('/', '-')}")
    secret = Secret(seeded.secret)
    env.vault_store.promote(key.vault_mount, key.vault_path, key.vault_field, secret,
                            provider_key_id=seeded.id, expected_version=None)
    return secret.fingerprint


def run_demo(*, keep: bool = False, json_out: bool = False, out: Optional[TextIO] = None) -> int:
    out = out or sys.stdout
    narrator = Narrator(out, quiet=json_out)
    started = time.monotonic()
    env = DemoEnvironment.start(keep=keep)
    try:
        return _run(env, narrator, keep=keep, json_out=json_out, out=out, started=started)
    finally:
        env.close()


def _run(env: DemoEnvironment, narrator: Narrator, *, keep: bool, json_out: bool, out: TextIO, started: float) -> int:
    say = narrator.say
    say(f"workdir {env.workdir} (SQLite {env.db_path.name})")
    say(f"vault: {'VAULT_ADDR' if env.vault_external else 'OpenBao dev server'} at {env.vault_url}, mount {env.vault_mount}")
    say(f"provider stand-in at {env.provider.url} (new keys go live after a short delay)")
    env.start_worker()
    say(f"broker: {'Redis' if env.broker_kind == 'redis' else 'in-process StubBroker'}, namespace {env.queue_namespace}; "
        "worker threads started")

    # The consumers read their key from Vault; they need the key paths, so start them before applying.
    for key_name, integration in CONSUMER_OF.items():
        env.start_consumer(integration, key_path=f"apps/{key_name.split('/')[1]}/alloy", key_field="api_key")
    keys = apply_demo_inventory(env, render_inventory(env))
    say(f"inventory applied: {len(keys)} keys ({', '.join(keys)})")

    with session_scope(env.engine) as session:
        rows = session.exec(select(ManagedKey).order_by(col(ManagedKey.name))).all()
    for key in rows:
        fp = seed_key(env, key)
        say(f"seeded {key.name}: provider key live, Vault {key.vault_mount}/{key.vault_path} holds {short_fp(fp)}")
    for name, consumer in env.consumers.items():
        consumer.reload()
        consumer.start_probing()
        say(f"consumer {name} at {consumer.url}: loaded its key from Vault, probing the provider")

    env.consumers[FAULTY_INTEGRATION].ignore_updates(True)
    say(f"fault injected: {FAULTY_INTEGRATION} will keep using the old key, so {FAULTY_KEY} must fail verification")

    follower = AuditFollower(env.engine)
    follower.start_from_now()
    run_ids: dict[str, str] = {}
    for key in rows:
        with session_scope(env.engine) as session:
            run, _ = request_rotation(session, key_name=key.name, reason="demo", trigger="manual",
                                      requested_by="cli:demo", idempotency_key=f"demo-{env.queue_namespace}-{key.name}")
        enqueue_run(run)
        run_ids[key.name] = run.id
    say(f"rotation requested for {len(run_ids)} keys (grace period {GRACE_S}s)")


    deadline = time.monotonic() + 45.0
    states: dict[str, str] = {}
    while True:
        for change in follower.poll():
            say(change.line(clock=False))
        retire_due(env.engine)  # the scheduler's retirement job: grace over → retire step
        with session_scope(env.engine) as session:
            runs = session.exec(select(RotationRun).where(col(RotationRun.id).in_(list(run_ids.values())))).all()
            states = {r.id: state_of(r) for r in runs}
        if all(s in STOP_STATES for s in states.values()):
            for change in follower.poll():
                say(change.line(clock=False))
            break
        if time.monotonic() > deadline:
            say("timed out waiting for the runs to finish")
            break
        time.sleep(0.2)

    probe = {name: c.stats() for name, c in env.consumers.items()}
    for consumer in env.consumers.values():
        consumer.stop_probing()
    summary = build_summary(env, run_ids)
    checks = run_checks(env, run_ids, probe, narrator)
    elapsed = time.monotonic() - started
    ok = all(c.ok for c in checks)
    if json_out:
        print_json({"ok": ok, "elapsed_s": round(elapsed, 2), "broker": env.broker_kind,
                    "vault": "external" if env.vault_external else "openbao-dev", "vault_addr": env.vault_url,
                    "vault_mount": env.vault_mount, "provider_url": env.provider.url,
                    "workdir": str(env.workdir), "database_url": env.database_url, "runs": summary,
                    "checks": [c.__dict__ for c in checks]}, out)
    else:
        out.write("\n")
        print_table(["key", "result", "old → new", "duration", "steps"],
                    [[s["key"], s["result"], f"{short_fp(s['old_fingerprint'])} → {short_fp(s['new_fingerprint'])}",
                      duration(s["duration_s"]), s["steps"]] for s in summary], stream=out, prose=["steps"])
        out.write("\n")
        for c in checks:
            out.write(f"{'ok  ' if c.ok else 'FAIL'}  {c.name}: {c.detail}\n")
        out.write(f"\n{'all invariants held' if ok else 'INVARIANTS VIOLATED'} in {elapsed:.1f}s\n")
        out.flush()
    if keep:
        _wait_for_interrupt(env, out)
    return 0 if ok else 1


def build_summary(env: DemoEnvironment, run_ids: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    with session_scope(env.engine) as session:
        for key_name, run_id in run_ids.items():
            run = session.get(RotationRun, run_id)
            assert run is not None
            old = session.get(KeyVersion, run.old_version_id) if run.old_version_id else None
            new = session.get(KeyVersion, run.new_version_id) if run.new_version_id else None
            steps = session.exec(select(AuditEvent).where(AuditEvent.run_id == run_id,
                                                          col(AuditEvent.to_state).is_not(None))).all()

            rows.append({"key": key_name, "run_id": run_id, "result": state_of(run),
                         "old_fingerprint": old.fingerprint if old else None,
                         "new_fingerprint": new.fingerprint if new else None,
                         "duration_s": run_duration_s(run), "steps": len(steps), "last_error": run.last_error})
    return rows


def run_checks(env: DemoEnvironment, run_ids: dict[str, str], probe: dict[str, dict[str, int]],
               narrator: Narrator) -> list[invariants.Check]:
    provider_state = env.provider.state

    def key_state(key_id: str) -> str:
        key = provider_state.keys.get(key_id)
        if key is None:
            return "unknown"
        if key.revoked:
            return "revoked"
        return "live" if provider_state.key_is_live(key) else "inactive"

    def read_current(key: ManagedKey) -> Any:
        return env.vault_store.read_current(key.vault_mount, key.vault_path, key.vault_field)

    failures = sum(p.get("probe_failures", 0) for p in probe.values())
    probes = sum(p.get("probes", 0) for p in probe.values())
    with provider_state.lock:
        issued = [k.secret for k in provider_state.keys.values()]
        live_ids = [k.id for k in provider_state.keys.values() if provider_state.key_is_live(k)]
    blobs = invariants.read_blobs(env.files_to_scan())
    blobs["narration"] = "\n".join(narrator.transcript).encode()
    return [
        invariants.vault_serves_working_keys(env.engine, read_current, env.provider.is_live),
        invariants.retired_only_after_verification_and_grace(env.engine, key_state),
        invariants.rollback_kept_old_key(env.engine, run_ids.get(FAULTY_KEY), key_state, read_current),
        invariants.no_orphans(env.engine, live_ids),
        invariants.audit_trail_is_a_chain(env.engine, run_ids.values()),
        invariants.consumer_saw_no_failures(failures, probes),
        invariants.no_secret_leaked(issued, blobs),
    ]


def _wait_for_interrupt(env: DemoEnvironment, out: TextIO) -> None:
    # Our own handlers, set before the message: a process started with SIGINT ignored (a background
    # job of a non-interactive shell) would otherwise never see the Ctrl-C this waits for.
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    out.write(f"\n--keep: Vault and the stand-ins stay up until Ctrl-C.\n"
              f"  KEYROTOR_DATABASE_URL={env.database_url} keyrotor status\n"
              f"  provider {env.provider.url}  vault {env.vault_url} (mount {env.vault_mount})\n"
              + (f"  the in-process worker serves Redis namespace {env.queue_namespace}: "
                 f"KEYROTOR_QUEUE_NAMESPACE={env.queue_namespace} keyrotor rotate KEY --wait\n"
                 if env.broker_kind == "redis" else ""))
    out.flush()
    while not stop.wait(1.0):
        pass
