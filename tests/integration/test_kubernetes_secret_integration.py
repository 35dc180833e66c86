"""The kubernetes_secret integration over HTTP against the Kubernetes API stand-in: one data key
written under resourceVersion concurrency, verify by fingerprint, rollback, RBAC refusals, and
the once-per-batch workload restart (clock injected)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, Iterator

import pytest

from worker.errors import PermanentError, TransientError
from worker.integrations.base import Announcement, VerifyStatus
from worker.integrations.kube_api import KubeApi, ObjectRef
from worker.integrations.kube_restarts import RESTART_WANTED, RESTARTED_AT, WRITTEN_AT
from worker.integrations.kubernetes_secret import KubernetesSecretIntegration
from worker.integrations.registry import build_integration
from worker.inventory.schema import KubernetesSecretIntegrationSpec
from keyrotor_sandbox.kubernetes import KubernetesStandIn
from worker.secret import Secret
from worker.settings import load_settings

pytestmark = pytest.mark.integration
NS = "apps"
WEB = ObjectRef("Deployment", NS, "web")


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Batch:
    """The runs a restart waits for (the database's answer, set by the test)."""

    def __init__(self) -> None:
        self.unpushed: list[str] = []
        self.asked: list[ObjectRef] = []

    def unpushed_runs(self, workload: ObjectRef) -> list[str]:
        self.asked.append(workload)
        return list(self.unpushed)


@pytest.fixture
def k8s() -> Iterator[KubernetesStandIn]:
    standin = KubernetesStandIn(rollout_delay_s=0.0).start()
    standin.add_secret(NS, "billing", {"other": "keep-me", "api_key": "old-value"})
    standin.add_workload(NS, "Deployment", "web")
    yield standin
    standin.stop()


@pytest.fixture
def token(k8s: KubernetesStandIn) -> str:
    token = k8s.add_token()
    k8s.grant(token, NS, "secrets", ["get", "update", "patch"], ["billing"])
    k8s.grant(token, NS, "deployments", ["get", "patch"], ["web"])
    return token


def _api(k8s: KubernetesStandIn, token: str) -> KubeApi:
    return KubeApi.from_settings(load_settings(k8s_api_server=k8s.url, k8s_token=token))


def _integration(k8s: KubernetesStandIn, token: str, *, data_key: str = "api_key", workloads: bool = True,
                 clock: Any = None, batch: Any = None, settle_s: float = 5.0, secret: str = "billing") -> KubernetesSecretIntegration:
    spec = KubernetesSecretIntegrationSpec(kind="kubernetes_secret", namespace=NS, secret=secret, data_key=data_key,
                                           workloads=[{"kind": "Deployment", "name": "web"}] if workloads else [],
                                           rollout_timeout="60s")
    return KubernetesSecretIntegration("k8s", spec, api=_api(k8s, token), batch=batch, settle_s=settle_s,
                                       max_wait_s=300, poll_s=1.0, clock=clock or Clock())


def _ann(value: str, event: str = "rotated") -> Announcement:
    secret = Secret(value)
    return Announcement(event=event, key_name="billing", run_id="run-1", provider_key_id="k1",
                        fingerprint=secret.fingerprint, vault_mount="secret", vault_path="billing", vault_version=2,
                        secret=secret)


def test_push_writes_only_its_key_and_verify_compares_fingerprints(k8s: KubernetesStandIn, token: str) -> None:
    integration = _integration(k8s, token, workloads=False)
    integration.push(_ann("new-value"))
    assert k8s.secret_values(NS, "billing") == {"other": "keep-me", "api_key": "new-value"}
    assert WRITTEN_AT in k8s.secret_annotations(NS, "billing")
    assert integration.verify(_ann("new-value")).status is VerifyStatus.ok
    other = integration.verify(_ann("something-else"))
    assert other.status is VerifyStatus.mismatch and other.reported_fingerprint == Secret("new-value").fingerprint

    writes = sum(1 for method, _, _ in k8s.requests if method == "PUT")
    integration.push(_ann("new-value"))  # re-delivery: nothing written
    assert sum(1 for method, _, _ in k8s.requests if method == "PUT") == writes


def test_a_concurrent_write_is_a_409_retried_without_losing_the_other_writer(k8s: KubernetesStandIn, token: str) -> None:
    integration = _integration(k8s, token, workloads=False)
    k8s.concurrent_write_after_next_read(NS, "billing", "other", "written-by-someone-else")
    integration.push(_ann("new-value"))
    puts = [status for method, _, status in k8s.requests if method == "PUT"]
    assert puts == [409, 200]
    assert k8s.secret_values(NS, "billing") == {"other": "written-by-someone-else", "api_key": "new-value"}


def test_conflicts_on_every_attempt_end_as_a_bounded_transient_error(k8s: KubernetesStandIn, token: str) -> None:
    integration = _integration(k8s, token, workloads=False)
    for _ in range(5):
        k8s.concurrent_write_after_next_read(NS, "billing", "other", "busy")
    with pytest.raises(TransientError, match="409 Conflict each time"):
        integration.push(_ann("new-value"))
    assert [s for m, _, s in k8s.requests if m == "PUT"] == [409] * 5


def test_rbac_refusal_is_permanent_names_the_secret_and_permission_and_never_the_value(k8s: KubernetesStandIn) -> None:
    token = k8s.add_token()
    k8s.grant(token, NS, "secrets", ["get"], ["billing"])  # may read, not update
    integration = _integration(k8s, token, workloads=False)
    with pytest.raises(PermanentError) as caught:
        integration.push(_ann("brand-new-secret-value"))
    text = str(caught.value)
    assert "403 Forbidden" in text and "Secret apps/billing" in text and "'update'" in text
    assert "brand-new-secret-value" not in text and "keep-me" not in text and "old-value" not in text
    assert caught.value.__cause__ is None and caught.value.__context__ is None  # no ApiException (body) attached
    assert k8s.secret_values(NS, "billing")["api_key"] == "old-value"


def test_a_missing_secret_and_a_rejected_token_are_clear_permanent_errors(k8s: KubernetesStandIn, token: str) -> None:
    k8s.grant(token, NS, "secrets", ["get"], ["absent"])
    with pytest.raises(PermanentError, match="404 Not Found: Secret apps/absent does not exist"):
        _integration(k8s, token, secret="absent", workloads=False).push(_ann("v"))
    with pytest.raises(PermanentError, match="401 Unauthorized"):
        _integration(k8s, "not-a-token", workloads=False).push(_ann("v"))


def test_rollback_writes_the_old_value_back_and_restarts_at_once(k8s: KubernetesStandIn, token: str) -> None:
    clock = Clock()
    integration = _integration(k8s, token, clock=clock)
    integration.push(_ann("new-value"))
    assert k8s.rollouts(NS, "Deployment", "web") == []       # a rotation's push only marks the workload
    clock.advance(1)
    integration.push(_ann("old-value", event="rolled_back"))
    assert k8s.secret_values(NS, "billing")["api_key"] == "old-value"
    assert len(k8s.rollouts(NS, "Deployment", "web")) == 1   # no verify step follows a rollback


def test_rollback_before_the_new_value_landed_writes_nothing(k8s: KubernetesStandIn) -> None:
    token = k8s.add_token()
    k8s.grant(token, NS, "secrets", ["get"], ["billing"])  # the push failed with 403; rollback must not need update
    k8s.grant(token, NS, "deployments", ["get", "patch"], ["web"])
    _integration(k8s, token).push(_ann("old-value", event="rolled_back"))
    assert k8s.rollouts(NS, "Deployment", "web") == []


def test_keys_of_one_batch_restart_the_workload_once_after_the_last_write(k8s: KubernetesStandIn, token: str) -> None:
    clock, batch = Clock(), Batch()
    first = _integration(k8s, token, data_key="key-a", clock=clock, batch=batch)
    second = _integration(k8s, token, data_key="key-b", clock=clock, batch=batch)
    batch.unpushed = ["run-b"]
    first.push(_ann("value-a"))
    assert "keyrotor.io/restart-wanted-after" in (_api(k8s, token).read_workload(WEB)["metadata"]["annotations"])

    clock.advance(1)
    settling = first.verify(_ann("value-a"))
    assert settling.status is VerifyStatus.pending and "restart in" in (settling.detail or "")
    clock.advance(10)
    waiting = first.verify(_ann("value-a"))  # quiet long enough, but run-b has not written yet
    assert waiting.status is VerifyStatus.pending and "run-b" in (waiting.detail or "")
    assert k8s.rollouts(NS, "Deployment", "web") == []

    second.push(_ann("value-b"))
    batch.unpushed = []
    clock.advance(1)
    assert first.verify(_ann("value-a")).status is VerifyStatus.pending  # the settle window restarts with b's write
    clock.advance(5)
    assert first.verify(_ann("value-a")).status is VerifyStatus.pending  # restarted now; rollout not yet seen
    rollouts = k8s.rollouts(NS, "Deployment", "web")
    assert len(rollouts) == 1
    for integration, value in ((first, "value-a"), (second, "value-b")):
        assert integration.verify(_ann(value)).status is VerifyStatus.ok
    assert len(k8s.rollouts(NS, "Deployment", "web")) == 1  # b's verification found the rollout covering its write
    restarted_at = datetime.fromisoformat(rollouts[0].restarted_at.replace("Z", "+00:00"))  # type: ignore[union-attr]
    written_at = datetime.fromisoformat(k8s.secret_annotations(NS, "billing")[WRITTEN_AT].replace("Z", "+00:00"))
    assert restarted_at >= written_at


def test_a_stalled_run_holds_the_restart_only_up_to_the_batch_wait(k8s: KubernetesStandIn, token: str) -> None:
    clock, batch = Clock(), Batch()
    integration = _integration(k8s, token, clock=clock, batch=batch)
    batch.unpushed = ["stuck-run"]
    integration.push(_ann("value"))
    clock.advance(299)
    assert integration.verify(_ann("value")).status is VerifyStatus.pending
    assert k8s.rollouts(NS, "Deployment", "web") == []
    clock.advance(2)
    integration.verify(_ann("value"))
    assert len(k8s.rollouts(NS, "Deployment", "web")) == 1


def test_a_rollout_that_never_finishes_fails_verification_after_its_timeout(token: str) -> None:
    standin = KubernetesStandIn(rollout_delay_s=3600).start()
    try:
        standin.add_secret(NS, "billing", {})
        standin.add_workload(NS, "Deployment", "web")
        token = standin.add_token()
        standin.grant(token, NS, "secrets", ["get", "update"], ["billing"])
        standin.grant(token, NS, "deployments", ["get", "patch"], ["web"])
        clock = Clock()
        integration = _integration(standin, token, clock=clock, settle_s=0)
        integration.push(_ann("value"))
        assert integration.verify(_ann("value")).status is VerifyStatus.pending   # restarts
        clock.advance(30)
        assert "rolling out" in (integration.verify(_ann("value")).detail or "")
        clock.advance(31)
        with pytest.raises(PermanentError, match="rollout of Deployment apps/web did not finish within 60s"):
            integration.verify(_ann("value"))
    finally:
        standin.stop()


def test_an_operators_kubectl_restart_after_the_write_counts(k8s: KubernetesStandIn, token: str) -> None:
    clock = Clock()
    integration = _integration(k8s, token, clock=clock)
    integration.push(_ann("value"))
    api = _api(k8s, token)
    obj = api.read_workload(WEB)
    later = (clock.now + timedelta(seconds=2)).strftime("%Y-%m-%dT%H:%M:%SZ")  # kubectl: whole seconds
    api.patch_workload(WEB, {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: later}}}}})
    assert obj["metadata"]["annotations"][RESTART_WANTED]
    assert integration.verify(_ann("value")).status is VerifyStatus.ok
    assert len(k8s.rollouts(NS, "Deployment", "web")) == 1


def test_build_integration_makes_the_kind_from_a_spec(k8s: KubernetesStandIn, token: str) -> None:
    spec = KubernetesSecretIntegrationSpec(kind="kubernetes_secret", namespace=NS, secret="billing", data_key="k")
    settings = load_settings(k8s_api_server=k8s.url, k8s_token=token)
    built = build_integration(spec, vault=None, resolve=lambda ref: ref, name="k8s", settings=settings)
    assert isinstance(built, KubernetesSecretIntegration)
    built.push(_ann("v"))
    assert k8s.secret_values(NS, "billing")["k"] == "v"
