"""The liveness job's pass: a few keys at a time after a shared cursor (wrapping around), keys with
an open run skipped, a rate-limited provider left for the next pass, a 434 → the migration, a 401
→ one rotation per dead Vault version, errors never stopping the pass. SQLite and PostgreSQL."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from sqlmodel import select

from worker.service.liveness import MemoryCursor, RedisCursor, check_liveness
from tests.scheduler_fakes import ALLOY_SPEC, RecordingPipeline, add_key, add_provider
from worker.db.models import ManagedKey, RotationRun
from worker.protocol.states import RunState
from worker.db.session import session_scope
from worker.errors import RateLimited, TransientError
from worker.providers.base import CheckOutcome
from worker.secret import Secret

pytestmark = pytest.mark.integration

SPEC = dict(ALLOY_SPEC, credential_types={"api_key": {"replacement": "pat"}, "pat": {}})


@dataclass
class Stored:
    secret: Secret
    version: int


class FakeVault:
    def __init__(self) -> None:
        self.values: dict[str, Stored] = {}

    def read_current(self, mount: str, path: str, field: str) -> Stored | None:
        return self.values.get(path)


class FakeProvider:
    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.checked: list[str] = []

    def check(self, secret: Secret, *, credential_type: str) -> CheckOutcome:
        self.checked.append(secret.reveal())
        answer = self.answers.get(secret.reveal(), CheckOutcome.valid)
        if isinstance(answer, Exception):
            raise answer
        return answer


@dataclass
class Ctx:
    engine: Any
    vault: FakeVault
    provider: FakeProvider

    def provider_factory(self, session: Any, key: ManagedKey) -> FakeProvider:
        return self.provider


@pytest.fixture
def ctx(engine: Any) -> Ctx:
    vault = FakeVault()
    with session_scope(engine) as s:
        add_provider(s, "alloy", SPEC)
        s.flush()
        for i in range(5):
            add_key(s, f"alloy/k{i}", "alloy")
            vault.values[f"apps/alloy/k{i}"] = Stored(Secret(f"secret-{i}"), 1)
    return Ctx(engine, vault, FakeProvider({}))


def test_a_few_keys_a_pass_after_the_cursor_wrapping_around(ctx: Ctx) -> None:
    cursor, pipeline = MemoryCursor(), RecordingPipeline()
    assert check_liveness(ctx, cursor=cursor, per_pass=2, pipeline=pipeline.as_pipeline()).valid == ["alloy/k0", "alloy/k1"]
    assert check_liveness(ctx, cursor=cursor, per_pass=2, pipeline=pipeline.as_pipeline()).valid == ["alloy/k2", "alloy/k3"]
    assert check_liveness(ctx, cursor=cursor, per_pass=2, pipeline=pipeline.as_pipeline()).valid == ["alloy/k4", "alloy/k0"]
    assert pipeline.requests == []


def test_434_migrates_401_rotates_once_per_dead_version_and_open_runs_are_skipped(ctx: Ctx) -> None:
    pipeline = RecordingPipeline()
    ctx.provider.answers = {"secret-1": CheckOutcome.deprecated, "secret-2": CheckOutcome.invalid}
    result = check_liveness(ctx, cursor=MemoryCursor(), per_pass=5, pipeline=pipeline.as_pipeline())
    assert sorted(result.rotations) == ["alloy/k1", "alloy/k2"]
    by_key = {r["key"]: r for r in pipeline.requests}
    assert by_key["alloy/k1"]["trigger"] == "deprecation" and by_key["alloy/k1"]["target_credential_type"] == "pat"
    assert by_key["alloy/k2"]["trigger"] == "liveness" and by_key["alloy/k2"]["reason"] == "revoked_externally"
    assert by_key["alloy/k2"]["idempotency_key"].endswith(":v1")
    # Those keys now have open runs: the next pass does not check them again.
    ctx.provider.checked.clear()
    again = check_liveness(ctx, cursor=MemoryCursor(), per_pass=5, pipeline=pipeline.as_pipeline())
    assert sorted(again.checked) == ["alloy/k0", "alloy/k3", "alloy/k4"] and "secret-2" not in ctx.provider.checked
    # The run ended but Vault still serves the same dead version: the same run, not another.
    with session_scope(ctx.engine) as s:
        for run in s.exec(select(RotationRun)).all():
            run.state, run.finished_at = RunState.failed.value, run.created_at
    third = check_liveness(ctx, cursor=MemoryCursor(), per_pass=5, pipeline=pipeline.as_pipeline())
    assert third.rotations["alloy/k2"] == result.rotations["alloy/k2"]


def test_rate_limited_provider_is_left_for_the_next_pass_and_errors_do_not_stop_it(ctx: Ctx) -> None:
    pipeline = RecordingPipeline()
    ctx.provider.answers = {"secret-0": TransientError("provider down"), "secret-1": RateLimited("slow down", retry_after=30)}
    cursor = MemoryCursor()
    result = check_liveness(ctx, cursor=cursor, per_pass=5, pipeline=pipeline.as_pipeline())
    assert result.errors == {"alloy/k0": "TransientError"}
    assert result.deferred == ["alloy/k1", "alloy/k2", "alloy/k3", "alloy/k4"] and result.checked == []
    assert ctx.provider.checked == ["secret-0", "secret-1"]          # nothing more sent while limited
    ctx.provider.answers = {}
    assert check_liveness(ctx, cursor=cursor, per_pass=5, pipeline=pipeline.as_pipeline()).valid[0] == "alloy/k1"


def test_the_cursor_is_shared_through_redis(redis_client: Any, redis_namespace: str) -> None:
    a, b = RedisCursor(redis_client, redis_namespace), RedisCursor(redis_client, redis_namespace)
    assert a.get() == 0
    a.set(42)
    assert b.get() == 42


def test_the_scheduler_runs_it_as_the_liveness_job(ctx: Ctx, redis_client: Any, redis_namespace: str) -> None:
    from jobs.leader import leader_lock_key
    from jobs.scheduler import JOB_NAMES, KeyrotorScheduler, SchedulerConfig

    assert "liveness" in JOB_NAMES
    pipeline = RecordingPipeline()
    config = SchedulerConfig(namespace=redis_namespace, lock_name=leader_lock_key(redis_namespace), liveness_per_pass=3)
    scheduler = KeyrotorScheduler(ctx.engine, redis_client, config, pipeline=pipeline.as_pipeline(),
                                  deposit_context=lambda: ctx)
    ctx.provider.answers = {"secret-4": CheckOutcome.invalid}
    assert scheduler.run_job("liveness") == {"checked": 3, "rotations": 0, "deferred": 0, "errors": 0}
    assert RedisCursor(redis_client, redis_namespace).get() > 0          # the next leader goes on from here
    assert scheduler.run_job("liveness")["rotations"] == 1               # k3, k4 (dead), k0
    assert [r["key"] for r in pipeline.requests] == ["alloy/k4"]


def test_a_key_removed_from_the_inventory_during_the_pass_is_skipped(ctx: Ctx) -> None:
    """The pass lists keys first, then checks each in its own transaction: a key pruned in
    between is left out (it used to end the pass with an AttributeError)."""

    class PruningProvider(FakeProvider):
        def check(self, secret: Secret, *, credential_type: str) -> CheckOutcome:
            if secret.reveal() == "secret-0":
                with session_scope(ctx.engine) as s:
                    s.delete(s.exec(select(ManagedKey).where(ManagedKey.name == "alloy/k1")).one())
            return super().check(secret, credential_type=credential_type)

    ctx.provider = PruningProvider({})
    result = check_liveness(ctx, cursor=MemoryCursor(), per_pass=5, pipeline=RecordingPipeline().as_pipeline())
    assert result.valid == ["alloy/k0", "alloy/k2", "alloy/k3", "alloy/k4"] and result.errors == {}
    assert "secret-1" not in ctx.provider.checked
