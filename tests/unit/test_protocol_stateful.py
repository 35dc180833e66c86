"""The rotation protocol against models of the provider, Vault and the integrations, driven by
Hypothesis: the real step functions (``steps.execute``), the real reconciler and orphan scan, on
SQLite, with crashes, duplicate and stale deliveries, and calls whose outcome is unknown (the
fault fires before or after the effect landed, or the call lands late) at any point.

After every rule: Vault never serves a key the provider rejects; at most one open run per key;
no key is revoked while Vault serves it; every audit transition is one the protocol allows, in
an unbroken chain. At the end of each example the system is left to settle (faults off, late
calls landed, messages delivered, reconciler and orphan scan run): then every key the provider
holds is accounted for — the one Vault serves, or one of a run that is still open.

``HYPOTHESIS_PROFILE=thorough`` runs many more and longer examples (tests/hypothesis_profiles.py).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test
from sqlmodel import Session, select

import tests.hypothesis_profiles  # noqa: F401  (loads the settings profile)
from worker.service.reconcile import recover_stuck_runs, revoke_orphans
from tests.fakes_pipeline import FakeIntegration, FakeProvider, FakeVault, World
from tests.scheduler_fakes import RecordingPipeline
from worker.clock import set_clock
from worker.db.migrate import upgrade
from worker.db.models import AuditEvent, KeyVersion, RotationRun
from worker.protocol.states import TERMINAL_STATES
from worker.errors import TransientError
from worker.pipeline.context import StepPolicy
from worker.pipeline.steps import execute
from worker.protocol import RunState, Step, allowed_transitions, next_step
from worker.secret import Secret
from worker.vault.errors import VaultUnavailable

POLICY = StepPolicy(max_retries=4, min_backoff_ms=500, max_backoff_ms=4000, time_limit_ms=30_000,
                    activation_poll_s=2, activation_timeout_s=30, revocation_timeout_s=10)
ISSUE_TIMEOUT_S = 10.0   # the model provider's request timeout: a late issue lands within it
ORPHAN_MIN_AGE_S = 600.0
MAX_QUEUE = 12


class WorkerKilled(SystemExit):
    """The worker process dies mid-step (``execute`` lets SystemExit through): the message is not
    acknowledged, so the broker delivers it again."""


# --------------------------------------------------------------------------- fault injection
@dataclass
class Fault:
    when: str   # "before" the effect, "after" it (the answer is lost), "late" (lands later), "kill_*"
    call: str


class Injector:
    """One armed fault per call name; a model's method asks it around its effect."""

    def __init__(self) -> None:
        self.armed: dict[str, str] = {}
        self.enabled = True

    def take(self, call: str) -> Optional[str]:
        return self.armed.pop(call, None) if self.enabled else None

    def around(self, call: str, effect: Callable[[], Any], error: Callable[[str], BaseException]) -> Any:
        when = self.take(call)
        if when in ("before", "kill_before"):
            raise WorkerKilled() if when == "kill_before" else error(f"{call}: timed out before it landed")
        result = effect()
        if when in ("after", "kill_after"):
            raise WorkerKilled() if when == "kill_after" else error(f"{call}: timed out, but it landed")
        return result


def _transient(message: str) -> BaseException:
    return TransientError(message)


def _vault_down(message: str) -> BaseException:
    return VaultUnavailable(message)


class ModelProvider(FakeProvider):
    """The provider: every call may fail before or after its effect; an issue call may land late
    (after the client gave up, within its request timeout); revoking the key Vault serves is
    recorded as a violation."""

    issue_timeout_s = ISSUE_TIMEOUT_S

    def __init__(self, injector: Injector, served: Callable[[], Optional[str]], now: Callable[[], Any]) -> None:
        super().__init__()
        self.injector = injector
        self.served = served
        self.now = now
        self.late_issues: list[tuple[Any, str, str]] = []   # (deadline, name, credential type)
        self.violations: list[str] = []

    def issue(self, *, name: str, credential_type: str, labels: dict[str, str]) -> Any:
        if self.injector.enabled and self.injector.armed.get("issue") == "late":
            self.injector.armed.pop("issue")
            from datetime import timedelta

            self.late_issues.append((self.now() + timedelta(seconds=ISSUE_TIMEOUT_S), name, credential_type))
            raise TransientError("issue: timed out (the request is still in flight)")
        return self.injector.around("issue", lambda: FakeProvider.issue(self, name=name, credential_type=credential_type,
                                                                          labels=labels), _transient)

    def land_late_issues(self, *, all_: bool = False) -> None:
        due = [x for x in self.late_issues if all_ or x[0] <= self.now()]
        for item in due:
            self.late_issues.remove(item)
            FakeProvider.issue(self, name=item[1], credential_type=item[2], labels={})

    def check(self, secret: Secret, *, credential_type: str) -> Any:
        return self.injector.around("check", lambda: FakeProvider.check(self, secret, credential_type=credential_type),
                                    _transient)

    def revoke(self, *, key_id: Optional[str], secret: Optional[Secret], credential_type: str) -> Any:
        def effect() -> Any:
            key = self.keys.get(key_id or "") or (self._find(secret.reveal()) if secret else None)
            if key is not None and key.valid and key.secret == self.served():
                self.violations.append(f"revoked {key.key_id} ({key.name}) while Vault served it")
            return FakeProvider.revoke(self, key_id=key_id, secret=secret, credential_type=credential_type)
        return self.injector.around("revoke", effect, _transient)

    def list_keys(self) -> Any:
        return self.injector.around("list", lambda: FakeProvider.list_keys(self), _transient)


class ModelVault(FakeVault):
    """Vault: writes may fail before or after landing; a staging write may land late."""

    def __init__(self, injector: Injector) -> None:
        super().__init__()
        self.injector = injector
        self.late_staging: list[tuple[str, str, Optional[str]]] = []

    def stage_pending(self, run_id: str, secret: Secret, provider_key_id: Optional[str], expires_at: Any = None) -> None:
        if self.injector.enabled and self.injector.armed.get("stage_pending") == "late":
            self.injector.armed.pop("stage_pending")
            self.late_staging.append((run_id, secret.reveal(), provider_key_id))
            raise VaultUnavailable("staging write timed out (it is still in flight)")
        self.injector.around("stage_pending", lambda: FakeVault.stage_pending(self, run_id, secret, provider_key_id,
                                                                              expires_at), _vault_down)

    def land_late_staging(self) -> None:
        for run_id, value, key_id in self.late_staging:
            self.staging[run_id] = (value, key_id)
        self.late_staging.clear()

    def read_pending(self, run_id: str) -> Any:
        return self.injector.around("read_pending", lambda: FakeVault.read_pending(self, run_id), _vault_down)

    def discard_pending(self, run_id: str) -> None:
        self.injector.around("discard_pending", lambda: FakeVault.discard_pending(self, run_id), _vault_down)

    def promote(self, mount: str, path: str, field: str, secret: Secret, provider_key_id: Optional[str],
                expected_version: Optional[int]) -> int:
        return self.injector.around("promote", lambda: FakeVault.promote(self, mount, path, field, secret, provider_key_id,
                                                                         expected_version), _vault_down)

    def restore(self, mount: str, path: str, from_version: int, expected_version: int) -> int:
        return self.injector.around("restore", lambda: FakeVault.restore(self, mount, path, from_version,
                                                                         expected_version), _vault_down)


class ModelIntegration(FakeIntegration):
    def __init__(self, name: str, injector: Injector) -> None:
        super().__init__(name)
        self.injector = injector

    def push(self, announcement: Any) -> None:
        self.injector.around("push", lambda: FakeIntegration.push(self, announcement), _transient)

    def verify(self, announcement: Any) -> Any:
        return self.injector.around("verify", lambda: FakeIntegration.verify(self, announcement), _transient)


FAULTS: list[tuple[str, str]] = (
    [(call, when) for call in ("issue", "check", "revoke", "list", "stage_pending", "read_pending", "discard_pending",
                               "promote", "restore", "push", "verify")
     for when in ("before", "after", "kill_before", "kill_after")]
    + [("issue", "late"), ("stage_pending", "late")]
)


# --------------------------------------------------------------------------- the machine
@dataclass(frozen=True)
class Message:
    step: Step
    run_id: str
    delay_ms: int = 0
    retries: int = 0


class RotationProtocol(RuleBasedStateMachine):
    template: Path
    workdir: Path
    counter = 0

    def __init__(self) -> None:
        super().__init__()
        RotationProtocol.counter += 1
        db = self.workdir / f"example-{RotationProtocol.counter}.db"
        shutil.copyfile(self.template, db)
        self.injector = Injector()
        self.world = World(url=f"sqlite:///{db}", provider=FakeProvider())  # provider replaced below
        self.vault = ModelVault(self.injector)
        self.world.vault = self.vault
        self.provider = ModelProvider(self.injector, served=self.world.vault_value, now=self.world.clock)
        self.world.provider = self.provider
        self.world.integrations = {}
        self.world.build(policy=POLICY, sinks=())
        for name in ("svc-a", "svc-b"):  # build() made plain fakes; the key names these two
            sink = ModelIntegration(name, self.injector)
            sink.held = self.world.old.secret if self.world.old else None
            self.world.integrations[name] = sink
        from worker.db.models import ManagedKey
        from worker.db.session import session_scope

        with session_scope(self.world.engine) as session:
            key = session.exec(select(ManagedKey)).one()
            key.integrations = ["svc-a", "svc-b"]
            session.add(key)
        self.queue: list[Message] = []
        self.delivered: list[Message] = []
        self.mode = self.provider.mode.value

    # ------------------------------------------------------------------ helpers
    def _enqueue(self, message: Message) -> None:
        self.queue.append(message)

    def _run(self, message: Message) -> None:
        if message.delay_ms:
            self.world.clock.advance(message.delay_ms / 1000)
        self.provider.land_late_issues()
        self.delivered.append(message)
        assert self.world.ctx is not None
        try:
            action = execute(self.world.ctx, message.step, message.run_id, retry_count=message.retries)
        except WorkerKilled:
            self.queue.append(Message(message.step, message.run_id, 0, message.retries))  # redelivered
            return
        if action.retry:
            self._enqueue(Message(message.step, message.run_id, action.delay_ms, message.retries + 1))
        elif action.step is not None:
            self._enqueue(Message(action.step, message.run_id, action.delay_ms, 0))

    def _runs(self) -> list[RotationRun]:
        with Session(self.world.engine) as session:
            return list(session.exec(select(RotationRun)).all())

    def _first_message(self, run_id: str) -> None:
        run = next(r for r in self._runs() if r.id == run_id)
        step = next_step(run.mode, RunState(run.state))
        if step is not None:
            self._enqueue(Message(step, run_id))

    # ------------------------------------------------------------------ rules
    @initialize()
    def first_request(self) -> None:
        """Every example starts with a rotation under way (more rules then act on a live run)."""
        self.request()

    @rule()
    def request(self) -> None:
        before = {r.id for r in self._runs()}
        run_id = self.world.request()
        if run_id not in before:
            self._first_message(run_id)

    @precondition(lambda self: bool(self.queue))
    @rule(pick=st.integers(min_value=0, max_value=MAX_QUEUE))
    def deliver(self, pick: int) -> None:
        self._run(self.queue.pop(pick % len(self.queue)))

    @precondition(lambda self: bool(self.queue) and len(self.queue) < MAX_QUEUE)
    @rule(pick=st.integers(min_value=0, max_value=MAX_QUEUE))
    def deliver_duplicate(self, pick: int) -> None:
        """The same message delivered twice (it stays queued)."""
        self._run(self.queue[pick % len(self.queue)])

    @precondition(lambda self: bool(self.delivered))
    @rule(pick=st.integers(min_value=0, max_value=200))
    def deliver_stale(self, pick: int) -> None:
        """An old message delivered again, long after the run moved on."""
        old = self.delivered[pick % len(self.delivered)]
        self._run(Message(old.step, old.run_id, 0, old.retries))

    @rule(fault=st.sampled_from(FAULTS))
    def arm_fault(self, fault: tuple[str, str]) -> None:
        call, when = fault
        self.injector.armed[call] = when

    @rule(seconds=st.sampled_from([1, 5, 15, 60, 700, 3700]))
    def advance_clock(self, seconds: int) -> None:
        self.world.clock.advance(seconds)
        self.provider.land_late_issues()

    @rule()
    def land_late_writes(self) -> None:
        self.vault.land_late_staging()

    @rule()
    def reconcile(self) -> None:
        pipeline = RecordingPipeline()
        recover_stuck_runs(self.world.engine, now=self.world.clock(), max_attempts=3, step_timeout_s=60,
                           pipeline=pipeline.as_pipeline(), notify=lambda *a, **k: None)
        for run_id in pipeline.enqueued:
            self._first_message(run_id)

    @rule()
    def orphan_scan(self) -> None:
        try:
            revoke_orphans(self.world.engine, now=self.world.clock(), min_age_s=ORPHAN_MIN_AGE_S,
                           provider_factory=lambda _record: self.provider)
        except WorkerKilled:
            pass  # the scheduler died mid-scan; the next pass starts over

    # ------------------------------------------------------------------ invariants
    @invariant()
    def vault_serves_a_key_the_provider_accepts(self) -> None:
        served = self.world.vault_value()
        accepted = served is not None and self.provider.is_valid(served)  # (no secret in the failure report)
        assert accepted, "Vault serves a key the provider rejects"

    @invariant()
    def no_revocation_of_a_served_key(self) -> None:
        assert not self.provider.violations, self.provider.violations

    @invariant()
    def at_most_one_open_run(self) -> None:
        open_runs = [r.id for r in self._runs() if RunState(r.state) not in TERMINAL_STATES]
        assert len(open_runs) <= 1, f"open runs: {open_runs}"

    @invariant()
    def audit_transitions_are_legal(self) -> None:
        allowed = allowed_transitions(self.mode)
        with Session(self.world.engine) as session:
            events = session.exec(select(AuditEvent).where(AuditEvent.event == "state_changed")
                                  .order_by(AuditEvent.id)).all()  # type: ignore[arg-type]
        last: dict[str, Optional[str]] = {}
        for event in events:
            run_id = event.run_id or ""
            if event.from_state is None:
                assert run_id not in last and event.to_state == RunState.requested.value, event
            else:
                assert last.get(run_id) == event.from_state, f"broken chain at {event.from_state}→{event.to_state}"
                pair = (RunState(event.from_state), RunState(event.to_state))
                assert pair in allowed, f"illegal transition {pair[0].value}→{pair[1].value}"
            last[run_id] = event.to_state

    # ------------------------------------------------------------------ settling
    def teardown(self) -> None:
        try:
            self._settle()
            self._every_key_accounted_for()
        finally:
            self.world.engine.dispose()
            set_clock(None)

    def _settle(self) -> None:
        self.injector.enabled = False
        self.provider.land_late_issues(all_=True)
        self.vault.land_late_staging()
        for _ in range(6):
            for _ in range(300):
                if not self.queue:
                    break
                self._run(self.queue.pop(0))
            self.world.clock.advance(ORPHAN_MIN_AGE_S + 100)
            self.reconcile()
            if not self.queue:
                break
        for _ in range(2):  # the first pass records when it saw each key (lists give no creation time)
            self.world.clock.advance(ORPHAN_MIN_AGE_S + 100)
            self.orphan_scan()
        self.vault_serves_a_key_the_provider_accepts()
        self.no_revocation_of_a_served_key()
        self.audit_transitions_are_legal()

    def _every_key_accounted_for(self) -> None:
        served = self.world.vault_value()
        open_runs = [r for r in self._runs() if RunState(r.state) not in TERMINAL_STATES]
        with Session(self.world.engine) as session:  # the key an open run replaces is still live
            replaced = {v.provider_key_id for r in open_runs if r.old_version_id
                        for v in [session.get(KeyVersion, r.old_version_id)] if v is not None}
        for key in self.provider.keys.values():
            if not key.valid or key.secret == served or key.key_id in replaced:
                continue
            owner = key.name.removeprefix("keyrotor-")
            assert owner in {r.id for r in open_runs}, (
                f"provider key {key.key_id} ({key.name}) is live, not served by Vault and not held by an open run")


@pytest.fixture(scope="module")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stateful") / "template.db"
    upgrade(f"sqlite:///{path}")
    return path


def test_rotation_protocol_holds_under_crashes_duplicates_and_unknown_outcomes(template_db: Path, tmp_path: Path) -> None:
    RotationProtocol.template = template_db
    RotationProtocol.workdir = tmp_path
    run_state_machine_as_test(RotationProtocol)
