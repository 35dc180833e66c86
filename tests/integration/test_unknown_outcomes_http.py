"""Calls whose outcome is unknown, end to end through the real adapters: the generic HTTP provider
against the provider stand-in (an issue request that lands after the client gave up), the real
``VaultStore`` (hvac) against Vault with staging writes held at the transport and landing after
the client timed out, on PostgreSQL. Steps are driven inline, in real time."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

import pytest
import requests
from requests.adapters import HTTPAdapter
from sqlmodel import Session, select

from worker.db.models import AuditEvent, ManagedKey, ProviderRecord
from worker.protocol.states import RunState
from worker.db.session import make_engine, session_scope
from worker.pipeline.context import PipelineContext, StepPolicy
from worker.runtime.inline import drive
from worker.pipeline.requests import request_rotation
from worker.pipeline.steps import execute
from worker.protocol import Step
from worker.providers.ratelimit import InMemoryRateLimiter
from worker.providers.registry import build_provider
from keyrotor_sandbox.provider import ProviderHandle, standin_provider_spec, start_provider_in_thread
from worker.secret import Secret
from worker.secret_refs import make_resolver
from worker.settings import load_settings
from worker.vault.store import VaultStore
from worker.vault.transport import DirectSession

pytestmark = pytest.mark.integration
KEY = "standin/late"


class HeldStagingWrites(HTTPAdapter):
    """While ``holding``, a write to a staging path is sent to Vault only ``hold_s`` later, and the
    client is told it timed out at once: the write's outcome is unknown to the caller and it lands."""

    def __init__(self, hold_s: float) -> None:
        super().__init__()
        self.hold_s, self.holding = hold_s, True
        self.held: list[threading.Thread] = []

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        if self.holding and request.method in ("POST", "PUT") and "/data/keyrotor/staging/" in (request.url or ""):
            def land_later() -> None:
                time.sleep(self.hold_s)
                super(HeldStagingWrites, self).send(request, **kwargs)
            thread = threading.Thread(target=land_later, daemon=True)
            thread.start()
            self.held.append(thread)
            raise requests.exceptions.ReadTimeout("held by the test: the write lands later")
        return super().send(request, **kwargs)

    def land_all(self) -> None:
        self.holding = False
        for thread in self.held:
            thread.join(timeout=10)


@dataclass
class Rig:
    ctx: PipelineContext
    provider: ProviderHandle
    store: VaultStore
    adapter: HeldStagingWrites
    mount: str
    old_secret: str

    def request(self) -> str:
        with session_scope(self.ctx.engine) as session:
            run, _ = request_rotation(session, key_name=KEY, reason="manual", trigger="manual", requested_by="test")
            return run.id

    def served(self) -> str:
        current = self.store.read_current(self.mount, "apps/late", "api_key")
        assert current is not None
        return current.secret.reveal()

    def keys_named(self, run_id: str) -> list[Any]:
        return [k for k in self.provider.state.keys.values() if k.name == f"keyrotor-{run_id}"]

    def events(self, run_id: str, event: str) -> list[AuditEvent]:
        with Session(self.ctx.engine) as session:
            return list(session.exec(select(AuditEvent).where(AuditEvent.run_id == run_id, AuditEvent.event == event)
                                     .order_by(AuditEvent.id)).all())


@pytest.fixture
def rig(pg_url: str, vault: Any, vault_mount: str) -> Iterator[Rig]:
    from worker.clock import set_clock

    set_clock(None)
    provider = start_provider_in_thread()
    spec = standin_provider_spec(provider.url, admin_token_ref={"env": "SBX_ADMIN"},
                                 activation={"poll_interval": "1s", "timeout": "3s"})
    spec["calls"]["issue"]["timeout"] = "1s"
    engine = make_engine(pg_url)
    seeded = provider.seed_key("seed-late")
    with session_scope(engine) as session:
        session.add(ProviderRecord(name="standin", kind="http", mode="overlap", spec=spec))
        session.flush()
        session.add(ManagedKey(name=KEY, provider="standin", credential_type="api_key", owner="team@example.com",
                               vault_mount=vault_mount, vault_path="apps/late", vault_field="api_key",
                               grace_period_s=0, integrations=[], labels={}))
    adapter = HeldStagingWrites(hold_s=0.5)
    adapter.holding = False
    http = DirectSession()  # the production session (worker/vault/transport.py), with the fault in its transport
    http.trust_env = False
    http.mount("http://", adapter)
    http.mount("https://", adapter)
    settings = load_settings(vault_addr=vault.addr, vault_token=vault.token, vault_mount=vault_mount, database_url=pg_url)
    store = VaultStore.from_settings(settings, session=http, retry_attempts=2, retry_base_delay=0.05, retry_max_delay=0.1)
    store.promote(vault_mount, "apps/late", "api_key", Secret(seeded.secret), seeded.id, None)
    resolve = make_resolver(None, {"SBX_ADMIN": provider.admin_token})
    limiter = InMemoryRateLimiter()

    def provider_factory(session: Session, key: ManagedKey) -> Any:
        record = session.get(ProviderRecord, key.provider)
        return build_provider(record, resolve=resolve, limiter=limiter, attempts=1)

    def no_integrations(_session: Session, name: str) -> Any:
        raise AssertionError(f"no integration expected, asked for {name}")

    ctx = PipelineContext(engine=engine, vault=store, provider_factory=provider_factory,
                          integration_factory=no_integrations, actor="worker:test", resolve=resolve,
                          policy=StepPolicy(max_retries=3, min_backoff_ms=50, max_backoff_ms=200, time_limit_ms=20_000,
                                            activation_poll_s=0.5, activation_timeout_s=3, revocation_timeout_s=3))
    try:
        yield Rig(ctx=ctx, provider=provider, store=store, adapter=adapter, mount=vault_mount, old_secret=seeded.secret)
    finally:
        adapter.land_all()
        provider.stop()
        engine.dispose()


def test_an_issue_call_that_times_out_but_lands_later_leaves_no_second_live_key(rig: Rig) -> None:
    """The issue request reaches the provider 1.6 s after it was sent; the client gave up after 1 s.
    The retry used to look once (nothing yet), issue a second key, and the late request then minted
    a key named after the run that nothing ever revoked."""
    rig.provider.add_fault("issue", delay=1.6)
    started = time.monotonic()
    run_id = rig.request()
    assert drive(rig.ctx, run_id, advance=time.sleep) == RunState.completed
    time.sleep(max(0.0, started + 2.5 - time.monotonic()))  # the held request has landed by now
    named = rig.keys_named(run_id)
    assert len(named) == 2                                   # the late one and the one the run uses
    live = [k for k in named if not k.revoked]
    assert [k.secret for k in live] == [rig.served()]        # exactly one live key: the one Vault serves
    unknown = rig.events(run_id, "issue_outcome_unknown")
    assert len(unknown) == 1 and unknown[0].detail["name"] == f"keyrotor-{run_id}"
    strays = rig.events(run_id, "stray_key_found")
    assert [(e.detail["provider_key_id"], e.detail["revocation"]) for e in strays] == \
        [(k.id, "revoked") for k in named if k.revoked]


def test_a_staging_write_that_times_out_and_lands_later_does_not_fail_the_run(rig: Rig) -> None:
    """Staging writes time out and the key is revoked; then the held writes land. The next attempt
    used to recover the revoked key from staging, precheck it for its whole activation timeout and
    compensate (the run failed, its audit saying `revoked` where the provider answered 404)."""
    rig.adapter.holding = True
    run_id = rig.request()
    action = execute(rig.ctx, Step.issue, run_id)
    assert action.retry                                      # staging failed without a definite answer
    rig.adapter.land_all()                                   # ... and the held writes land now
    first = rig.keys_named(run_id)
    assert len(first) == 1 and first[0].revoked              # known not staged at the time: revoked
    assert drive(rig.ctx, run_id, advance=time.sleep) == RunState.completed
    served = rig.served()
    assert served not in (first[0].secret, rig.old_secret) and rig.provider.is_live(served)
    rejected = rig.events(run_id, "staging_rejected")
    assert [e.detail["provider_key_id"] for e in rejected] == [first[0].id]
    assert [e.detail["revocation"] for e in rig.events(run_id, "new_key_discarded")] == ["revoked"]
