"""The whole rotation protocol through the real adapters, in one process.

Real ``VaultStore`` (hvac) against a real OpenBao server, the real generic HTTP provider against the
provider stand-in, the real webhook integration against the consumer stand-in (which reads its
key from Vault and probes the provider with it all along), a real ``vault_copy`` integration,
and the real ``PipelineContext`` from settings (``context_from_settings``: registry factories,
Redis-shared rate limiter) over an inventory applied with ``apply_inventory``. Steps run on a
StubBroker with a real Dramatiq worker; the request arrives as a v1 queue message. SQLite and
PostgreSQL. Run with the root token on a mount of the test's own, and with a token holding exactly
config/vault-policy.hcl on the mounts that policy names.
"""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from sqlmodel import Session, select

from worker.db.models import AuditEvent, KeyVersion, ManagedKey, RotationRun, VersionStage
from worker.protocol.states import RunState
from worker.db.session import session_scope
from worker.text import key_slug
from worker.secret import Secret, fingerprint

pytestmark = pytest.mark.integration

KEY = "standin/reporting"
PROVIDER = "standin"
GRACE_S = 1
FINAL = {RunState.completed, RunState.failed, RunState.rolled_back, RunState.needs_attention, RunState.cancelled}

INVENTORY = """
version: 1
policies:
  fast: {{expiry_lead_time: 7d, max_age: 90d, grace_period: {grace}s}}
providers:
  {provider}:
    kind: http
    mode: overlap
    base_url: "{provider_url}"
    rate_limit: {{requests: 100, per: 1s}}
    auth: {{type: bearer, token: {{env: KR_TEST_PROVIDER_ADMIN}}}}
    activation: {{poll_interval: 1s, timeout: 10s}}
    status_codes: {{deprecated: [434]}}
    credential_types:
      api_key: {{}}
    calls:
      issue:
        method: POST
        url: "{{base_url}}/api/api-key"
        body: {{name: "{{key_name}}", credentialType: "{{credential_type}}"}}
        response: {{secret: "$.apiKey", key_id: "$.id", expires_at: "$.expiresAt"}}
      verify:
        method: GET
        url: "{{base_url}}/api/user/me"
        auth: {{type: bearer, token: "{{secret}}"}}
      revoke:
        method: DELETE
        url: "{{base_url}}/api/api-key/{{key_id}}"
      list:
        method: GET
        url: "{{base_url}}/api/api-key"
        response: {{items: "$.keys", key_id: "$.id", name: "$.name", created_at: "$.createdAt"}}
integrations:
  reporting-consumer:
    kind: webhook
    url: "{consumer_url}/hooks/keyrotor"
    signing_secret: {{env: KR_TEST_WEBHOOK_SECRET}}
    include_secret: false
    health_url: "{consumer_url}/health"
  reporting-copy:
    kind: vault_copy
    mount: {copy_mount}
    path: "{copy_prefix}/{{key_slug}}"
    field: token
keys:
  {key}:
    provider: {provider}
    credential_type: api_key
    owner: data-platform@example.com
    vault: {{mount: {mount}, path: {key_path}, field: api_key}}
    policy: fast
    integrations: [reporting-consumer, reporting-copy]
"""


@dataclass(frozen=True)
class VaultLayout:
    """The token keyrotor runs with, where the key lives, and where the vault_copy integration writes."""

    token: str
    mount: str
    key_path: str
    copy_mount: str
    copy_prefix: str


@pytest.fixture(params=["root"])
def layout(request: pytest.FixtureRequest, vault: Any) -> VaultLayout:
    """``root``: the root token on the test's own mount. ``shipped-policy``: a token holding exactly
    config/vault-policy.hcl, with the key under ``secret/apps/`` and the copy on ``apps/``."""
    if request.param == "root":
        mount = request.getfixturevalue("vault_mount")
        return VaultLayout(vault.token, mount, "apps/reporting", mount, "copies")
    unique = uuid.uuid4().hex[:8]
    return VaultLayout(request.getfixturevalue("shipped_policy_token"), "secret", f"apps/{unique}/reporting",
                       "apps", unique)


@dataclass
class Stack:
    engine: Any
    store: Any
    provider: Any
    consumer: Any
    mount: str
    key_path: str
    copy_mount: str
    old_secret: str
    old_key_id: str
    copy_path: str = ""
    notifications: list[tuple[str, str | None]] = field(default_factory=list)
    samples: list[tuple[datetime, str, bool]] = field(default_factory=list)  # (when, run state, old key live)

    def current(self) -> Any:
        return self.store.read_current(self.mount, self.key_path, "api_key")

    def copy(self) -> Any:
        return self.store.read_current(self.copy_mount, self.copy_path, "token")

    def sandbox_key(self, run_id: str) -> Any:
        return next(k for k in self.provider.state.keys.values() if k.name == f"keyrotor-{run_id}")

    def health(self) -> dict[str, Any]:
        return httpx.get(self.consumer.health_url, timeout=5).json()  # type: ignore[no-any-return]


@pytest.fixture
def stack(db_url: str, redis_url: str, redis_namespace: str, vault: Any, layout: VaultLayout, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    from worker.clock import set_clock
    from worker.db.session import make_engine
    from worker.inventory.apply import apply_inventory
    from worker.inventory.loader import load_inventory
    from worker.runtime.broker import make_stub_broker, reset_broker, setup_broker
    from worker.pipeline.context import StepPolicy, configure, context_from_settings
    from worker.runtime.workers import start_worker
    from keyrotor_sandbox.consumer import start_consumer_in_thread
    from keyrotor_sandbox.provider import start_provider_in_thread
    from worker.settings import load_settings

    set_clock(None)
    provider = start_provider_in_thread(activation_delay=0.5)
    webhook_secret = secrets.token_urlsafe(24)
    monkeypatch.setenv("KR_TEST_PROVIDER_ADMIN", provider.admin_token)
    monkeypatch.setenv("KR_TEST_WEBHOOK_SECRET", webhook_secret)
    settings = load_settings(vault_addr=vault.addr, vault_token=layout.token, vault_mount=layout.mount,
                             database_url=db_url, redis_url=redis_url, queue_namespace=redis_namespace)
    engine = make_engine(db_url)

    # The key's first credential: live at the provider, in Vault, and in the application's copy.
    seeded = provider.seed_key("seed-reporting")
    from worker.vault.store import VaultStore

    store = VaultStore.from_settings(settings)
    store.promote(layout.mount, layout.key_path, "api_key", Secret(seeded.secret), seeded.id, None)
    copy_path = f"{layout.copy_prefix}/{key_slug(KEY)}"
    store.write(layout.copy_mount, copy_path, {"token": seeded.secret, "keyrotor_key_id": seeded.id})

    # The application reads its key with a token of its own (here: root).
    consumer = start_consumer_in_thread(vault_addr=vault.addr, vault_token=vault.token, mount=layout.mount,
                                        path=layout.key_path, signing_secret=webhook_secret,
                                        provider_url=provider.url, probe_interval_ms=25)
    inventory_file = tmp_path / "inventory.yaml"
    inventory_file.write_text(INVENTORY.format(grace=GRACE_S, provider=PROVIDER, provider_url=provider.url,
                                               consumer_url=consumer.url, mount=layout.mount, key=KEY,
                                               key_path=layout.key_path, copy_mount=layout.copy_mount,
                                               copy_prefix=layout.copy_prefix))
    with session_scope(engine) as session:
        apply_inventory(session, load_inventory(inventory_file), actor="test")

    broker = setup_broker(broker=make_stub_broker())
    ctx = context_from_settings(settings)  # the real wiring: registry factories, shared limiter
    ctx.policy = StepPolicy(max_retries=2, min_backoff_ms=50, max_backoff_ms=200, time_limit_ms=20_000,
                            activation_poll_s=0.2, activation_timeout_s=10, revocation_timeout_s=5)
    notifications: list[tuple[str, str | None]] = []
    # worker.notify reads the process settings' database, not this test's: record instead.
    ctx.notify = lambda event, *, key_name, run_id, detail: notifications.append((event, run_id))
    configure(ctx)
    worker = start_worker(broker, threads=4)
    try:
        yield Stack(engine=engine, store=store, provider=provider, consumer=consumer, mount=layout.mount,
                    key_path=layout.key_path, copy_mount=layout.copy_mount, old_secret=seeded.secret, old_key_id=seeded.id, copy_path=copy_path, notifications=notifications)
    finally:
        worker.stop()
        configure(None)
        reset_broker()
        consumer.stop()
        provider.stop()
        ctx.engine.dispose()
        engine.dispose()


def request_and_wait(stack: Stack, *, timeout: float = 30.0) -> tuple[str, RunState]:
    """Send a v1 rotation request message, then watch the run (sampling whether the old key is
    still live at the provider in each state) until it ends."""
    from worker.queues import send_request

    send_request({"version": 1, "key": KEY, "reason": "manual", "requested_by": "test:http",
                  "idempotency_key": uuid.uuid4().hex})
    deadline = time.monotonic() + timeout
    run_id, state = None, None
    while time.monotonic() < deadline:
        with Session(stack.engine) as session:
            run = session.exec(select(RotationRun)).first()
            if run is not None:
                run_id, state = run.id, RunState(run.state)
        if state is not None:
            stack.samples.append((datetime.now(timezone.utc), state.value, stack.provider.is_live(stack.old_secret)))
            if state in FINAL:
                return run_id, state  # type: ignore[return-value]
        time.sleep(0.02)
    raise AssertionError(f"run {run_id} did not finish in {timeout}s (last state {state})")


def audit(stack: Stack, run_id: str) -> list[AuditEvent]:
    with Session(stack.engine) as session:
        return list(session.exec(select(AuditEvent).where(AuditEvent.run_id == run_id).order_by(AuditEvent.id)).all())


def test_completed_rotation_through_real_adapters(stack: Stack) -> None:
    started = time.monotonic()
    run_id, state = request_and_wait(stack)
    elapsed = time.monotonic() - started
    print(f"\nrotation through real Vault/provider/webhook/vault_copy adapters: {elapsed:.2f}s")
    events = audit(stack, run_id)
    assert state == RunState.completed, [e.detail for e in events if e.to_state in ("needs_attention", "compensating")]
    new_key = stack.sandbox_key(run_id)
    new_fp = fingerprint(new_key.secret)
    # Vault serves the new key (as the newest version), the copy holds it, the consumer uses it.
    current = stack.current()
    assert current.secret.reveal() == new_key.secret and current.version == 2 and current.provider_key_id == new_key.id
    assert stack.copy().secret.reveal() == new_key.secret
    assert stack.consumer.fingerprint == new_fp and stack.health()["fingerprint"] == new_fp
    assert stack.health()["ok"] is True
    # The old key is revoked at the provider, only after verification and the grace period.
    assert stack.provider.key(stack.old_key_id).revoked and stack.provider.is_live(new_key.secret)
    from worker.clock import as_utc

    at = {e.to_state: as_utc(e.at) for e in events if e.event == "state_changed"}
    assert (at["retired"] - at["verified"]).total_seconds() >= GRACE_S
    grace_end = at["verified"] + timedelta(seconds=GRACE_S)
    assert any(s == "verified" and live for _, s, live in stack.samples)
    dead_early = [(when, s) for when, s, live in stack.samples if not live and when < grace_end]
    assert not dead_early, f"the old key stopped working before verification + grace: {dead_early[:3]}"
    # Invariant 1 from the outside: the application never failed a call during the rotation.
    stats = stack.consumer.stats()
    assert stats["probes"] > 10 and stats["probe_failures"] == 0, stats["failure_statuses"]
    with Session(stack.engine) as session:
        versions = {v.stage for v in session.exec(select(KeyVersion)).all()}
        assert versions == {VersionStage.current.value, VersionStage.retired.value}
        assert session.exec(select(ManagedKey)).one().last_rotated_at is not None
    # Nothing staged is left behind, and the provider saw exactly one issue and one revoke.
    from worker.pipeline.effects import read_pending

    assert read_pending(stack.store, run_id) is None
    routes = stack.provider.stats()["routes"]
    assert routes["issue"] == {"201": 1} and routes["revoke"] == {"204": 1}
    assert stack.notifications == [("succeeded", run_id)]


@pytest.mark.parametrize("layout", ["shipped-policy"], indirect=True)
def test_rotation_under_the_shipped_policy_and_refused_outside_it(stack: Stack) -> None:
    """The worker's token holds exactly config/vault-policy.hcl: the whole rotation (stage, promote,
    metadata, vault_copy, discard) runs under it, and Vault answers 403 anywhere else."""
    from worker.vault import VaultPermissionDenied

    run_id, state = request_and_wait(stack)
    assert state == RunState.completed, [e.detail for e in audit(stack, run_id) if e.detail]
    new_key = stack.sandbox_key(run_id)
    assert stack.current().secret.reveal() == new_key.secret and stack.copy().secret.reveal() == new_key.secret
    assert stack.provider.key(stack.old_key_id).revoked
    outside = [
        lambda: stack.store.write("secret", f"other/{run_id}", {"api_key": "x"}),
        lambda: stack.store.read_field("secret", f"other/{run_id}", "api_key"),
        lambda: stack.store.write("secret", f"keyrotor/providers/{run_id}", {"admin_token": "x"}),
        lambda: stack.store.set_custom_metadata("apps", stack.copy_path, {"keyrotor_run": run_id}),
    ]
    for attempt in outside:
        with pytest.raises(VaultPermissionDenied) as refused:
            attempt()
        assert refused.value.status == 403


def test_failure_before_promotion_revokes_the_new_key(stack: Stack) -> None:
    stack.consumer.stop_probing()  # the injected fault hits every check call, the application's too
    stack.provider.add_fault("check", status=400, count=10_000)
    run_id, state = request_and_wait(stack)
    stack.provider.state.faults.clear()
    assert state == RunState.failed
    with Session(stack.engine) as session:
        run = session.get(RotationRun, run_id)
        assert "400" in run.last_error
    assert stack.sandbox_key(run_id).revoked                      # the new key: revoked
    assert stack.provider.is_live(stack.old_secret)               # the old key: untouched
    current = stack.current()
    assert current.secret.reveal() == stack.old_secret and current.version == 1
    assert stack.copy().secret.reveal() == stack.old_secret
    assert stack.health()["fingerprint"] == fingerprint(stack.old_secret) and stack.health()["ok"] is True
    states = [e.to_state for e in audit(stack, run_id) if e.event == "state_changed"]
    assert states == ["requested", "issued", "compensating", "failed"]
    assert stack.notifications == [("failed", run_id)]


@pytest.mark.parametrize("layout", ["root", "shipped-policy"], indirect=True)
def test_failure_after_promotion_rolls_back(stack: Stack) -> None:
    stack.consumer.ignore_updates(True)  # the application keeps the old key: verification must fail
    run_id, state = request_and_wait(stack)
    events = audit(stack, run_id)
    assert state == RunState.rolled_back, [e.detail for e in events if e.to_state == "needs_attention"]
    states = [e.to_state for e in events if e.event == "state_changed"]
    assert states[-2:] == ["rolling_back", "rolled_back"] and "promoted" in states and "verified" not in states
    # Vault's newest version is the old secret again (3: seed, new, restored); history kept.
    current = stack.current()
    assert current.secret.reveal() == stack.old_secret and current.version == 3
    assert stack.copy().secret.reveal() == stack.old_secret                  # copy restored
    assert stack.health()["fingerprint"] == fingerprint(stack.old_secret)
    assert stack.consumer.stats()["webhooks_ignored"] >= 2                   # rotated, then rolled_back re-push
    assert stack.sandbox_key(run_id).revoked                                 # new key revoked
    assert stack.provider.is_live(stack.old_secret) and not stack.provider.key(stack.old_key_id).revoked
    assert stack.consumer.stats()["probe_failures"] == 0
    assert stack.notifications == [("rolled_back", run_id)]


# --------------------------------------------------------------------------- configuration errors
def _assert_failed_before_any_effect(stack: Stack, run_id: str, state: RunState, reference: str) -> None:
    """The run failed in its first step, on the first try, and nothing happened outside the database."""
    events = audit(stack, run_id)
    assert state == RunState.failed, [e.detail for e in events]
    states = [e.to_state for e in events if e.event == "state_changed"]
    assert states == ["requested", "compensating", "failed"]
    assert not [e for e in events if e.event == "step_retry"]          # a ConfigError is never retried
    with Session(stack.engine) as session:
        run = session.get(RotationRun, run_id)
        assert reference in run.last_error and "nothing was issued" in run.last_error
    assert "issue" not in stack.provider.stats()["routes"]               # no key was minted
    current = stack.current()
    assert current.secret.reveal() == stack.old_secret and current.version == 1


def test_missing_env_reference_fails_the_run_before_the_provider_issues(stack: Stack,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KR_TEST_WEBHOOK_SECRET")  # the integration's signing secret: env:KR_TEST_WEBHOOK_SECRET
    run_id, state = request_and_wait(stack)
    _assert_failed_before_any_effect(stack, run_id, state, "env:KR_TEST_WEBHOOK_SECRET")


def test_missing_vault_reference_fails_the_run_before_the_provider_issues(stack: Stack) -> None:
    from worker.db.models import IntegrationRecord

    with session_scope(stack.engine) as session:
        record = session.get(IntegrationRecord, "reporting-consumer")
        record.spec = {**record.spec, "signing_secret": {"vault": f"{stack.mount}/nowhere/signing#secret"}}
        session.add(record)
    run_id, state = request_and_wait(stack)
    _assert_failed_before_any_effect(stack, run_id, state, f"vault:{stack.mount}/nowhere/signing#secret")


def test_emergency_with_a_rejected_issue_call_needs_attention_not_failed(stack: Stack) -> None:
    """Emergency against an independent provider whose issue call answers 400: the key keeps the
    exposed credential, so the run ends in needs_attention with an alert (never a quiet `failed`),
    and nothing was issued."""
    from worker.queues import send_request

    stack.provider.add_fault("issue", status=400, count=10_000)
    send_request({"version": 1, "provider": PROVIDER, "all": True, "emergency": True, "reason": "breach",
                  "requested_by": "test:security", "idempotency_key": uuid.uuid4().hex})
    deadline = time.monotonic() + 30
    run = None
    while time.monotonic() < deadline:
        with Session(stack.engine) as session:
            run = session.exec(select(RotationRun)).first()
            if run is not None and RunState(run.state) in FINAL:
                break
        time.sleep(0.05)
    stack.provider.state.faults.clear()
    assert run is not None and run.emergency
    assert RunState(run.state) == RunState.needs_attention, run.state
    assert "400" in (run.last_error or "")
    deadline = time.monotonic() + 10  # the alert goes out just after the state change commits
    while not stack.notifications and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stack.notifications == [("needs_attention", run.id)]
    assert stack.provider.is_live(stack.old_secret) and stack.current().secret.reveal() == stack.old_secret
