"""The Kubernetes API stand-in speaks the API server's protocol: driven with the official
``kubernetes`` client (no keyrotor code in between), its answers parse as the client expects —
objects as V1Secret/V1Deployment, errors as ``ApiException`` with a ``Status`` body."""

from __future__ import annotations

import json
import time
from typing import Any, Iterator

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from keyrotor_sandbox.kubernetes import KubernetesStandIn

pytestmark = pytest.mark.integration
NS = "apps"


@pytest.fixture
def k8s() -> Iterator[KubernetesStandIn]:
    standin = KubernetesStandIn(rollout_delay_s=0.3).start()
    standin.add_secret(NS, "billing", {"other": "untouched"})
    standin.add_workload(NS, "Deployment", "web", replicas=3)
    standin.add_workload(NS, "StatefulSet", "db", replicas=2)
    yield standin
    standin.stop()


def _api(k8s: KubernetesStandIn, token: str | None) -> client.ApiClient:
    configuration = client.Configuration()
    configuration.host = k8s.url
    if token is not None:
        configuration.api_key = {"BearerToken": token}
        configuration.api_key_prefix = {"BearerToken": "Bearer"}
    return client.ApiClient(configuration)


def _granted(k8s: KubernetesStandIn) -> client.ApiClient:
    token = k8s.add_token()
    k8s.grant(token, NS, "secrets", ["get", "update", "patch"], ["billing"])
    k8s.grant(token, NS, "deployments", ["get", "patch"], ["web"])
    k8s.grant(token, NS, "statefulsets", ["get", "patch"], ["db"])
    return _api(k8s, token)


def _status(exc: ApiException) -> dict[str, Any]:
    body = json.loads(exc.body)
    assert body["kind"] == "Status" and body["status"] == "Failure" and body["code"] == exc.status
    return body  # type: ignore[no-any-return]


def test_secret_read_and_replace_round_trip_through_the_client(k8s: KubernetesStandIn) -> None:
    core = client.CoreV1Api(_granted(k8s))
    secret = core.read_namespaced_secret("billing", NS)
    assert isinstance(secret, client.V1Secret) and secret.data == {"other": "dW50b3VjaGVk"}
    secret.data["api_key"] = "bmV3"
    replaced = core.replace_namespaced_secret("billing", NS, secret)
    assert int(replaced.metadata.resource_version) > int(secret.metadata.resource_version)
    assert k8s.secret_values(NS, "billing") == {"other": "untouched", "api_key": "new"}


def test_a_stale_resource_version_is_a_409_conflict_with_a_status_body(k8s: KubernetesStandIn) -> None:
    core = client.CoreV1Api(_granted(k8s))
    stale = core.read_namespaced_secret("billing", NS)
    fresh = core.read_namespaced_secret("billing", NS)
    fresh.data["a"] = "YQ=="
    core.replace_namespaced_secret("billing", NS, fresh)
    stale.data["b"] = "Yg=="
    with pytest.raises(ApiException) as caught:
        core.replace_namespaced_secret("billing", NS, stale)
    assert caught.value.status == 409 and _status(caught.value)["reason"] == "Conflict"
    assert "the object has been modified" in _status(caught.value)["message"]
    # a merge patch carrying the stale resourceVersion is refused the same way
    with pytest.raises(ApiException) as patched:
        core.patch_namespaced_secret("billing", NS, {"metadata": {"resourceVersion": stale.metadata.resource_version},
                                                     "data": {"b": "Yg=="}},
                                     _content_type="application/merge-patch+json")
    assert patched.value.status == 409
    assert "b" not in k8s.secret_values(NS, "billing")


def test_update_without_a_resource_version_is_invalid(k8s: KubernetesStandIn) -> None:
    core = client.CoreV1Api(_granted(k8s))
    body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "billing", "namespace": NS}, "data": {}}
    with pytest.raises(ApiException) as caught:
        core.replace_namespaced_secret("billing", NS, body)
    assert caught.value.status == 422 and _status(caught.value)["reason"] == "Invalid"


def test_no_token_is_401_and_outside_the_grant_is_403_naming_verb_and_resource(k8s: KubernetesStandIn) -> None:
    with pytest.raises(ApiException) as anonymous:
        client.CoreV1Api(_api(k8s, None)).read_namespaced_secret("billing", NS)
    assert anonymous.value.status == 401 and _status(anonymous.value)["reason"] == "Unauthorized"

    token = k8s.add_token("system:serviceaccount:keyrotor:keyrotor")
    k8s.grant(token, NS, "secrets", ["get"], ["billing"])  # read-only, one Secret
    core = client.CoreV1Api(_api(k8s, token))
    secret = core.read_namespaced_secret("billing", NS)
    with pytest.raises(ApiException) as update:
        core.replace_namespaced_secret("billing", NS, secret)
    body = _status(update.value)
    assert update.value.status == 403 and body["reason"] == "Forbidden"
    assert body["message"] == ('secrets "billing" is forbidden: User "system:serviceaccount:keyrotor:keyrotor" cannot '
                               'update resource "secrets" in API group "" in the namespace "apps"')
    with pytest.raises(ApiException) as other_name:
        core.read_namespaced_secret("payroll", NS)  # resourceNames: not even its existence is told
    assert other_name.value.status == 403
    with pytest.raises(ApiException) as other_namespace:
        core.read_namespaced_secret("billing", "kube-system")
    assert other_namespace.value.status == 403


def test_missing_objects_inside_the_grant_are_404(k8s: KubernetesStandIn) -> None:
    token = k8s.add_token()
    k8s.grant(token, NS, "secrets", ["get"])          # every Secret of the namespace
    k8s.grant(token, NS, "deployments", ["get"])
    api = _api(k8s, token)
    with pytest.raises(ApiException) as secret:
        client.CoreV1Api(api).read_namespaced_secret("absent", NS)
    assert secret.value.status == 404 and _status(secret.value)["reason"] == "NotFound"
    with pytest.raises(ApiException) as deployment:
        client.AppsV1Api(api).read_namespaced_deployment("absent", NS)
    assert deployment.value.status == 404


@pytest.mark.parametrize("kind", ["Deployment", "StatefulSet"])
def test_a_restart_bumps_the_generation_and_the_rollout_catches_up_later(k8s: KubernetesStandIn, kind: str) -> None:
    apps = client.AppsV1Api(_granted(k8s))
    name = "web" if kind == "Deployment" else "db"
    read = apps.read_namespaced_deployment if kind == "Deployment" else apps.read_namespaced_stateful_set
    patch = apps.patch_namespaced_deployment if kind == "Deployment" else apps.patch_namespaced_stateful_set
    before = read(name, NS)
    assert before.metadata.generation == 1 and before.status.observed_generation == 1

    # metadata-only change: no rollout
    patch(name, NS, {"metadata": {"annotations": {"note": "x"}}}, _content_type="application/merge-patch+json")
    assert read(name, NS).metadata.generation == 1 and k8s.rollouts(NS, kind, name) == []

    restarted = patch(name, NS, {"spec": {"template": {"metadata": {"annotations": {
        "kubectl.kubernetes.io/restartedAt": "2030-01-01T00:00:00Z"}}}}}, _content_type="application/merge-patch+json")
    assert restarted.metadata.generation == 2
    assert restarted.status.observed_generation == 1 and restarted.status.updated_replicas == 0
    assert [r.restarted_at for r in k8s.rollouts(NS, kind, name)] == ["2030-01-01T00:00:00Z"]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # polled, as keyrotor does (no watch)
        status = read(name, NS).status
        if status.observed_generation == 2:
            break
        time.sleep(0.05)
    replicas = before.spec.replicas
    assert (status.observed_generation, status.updated_replicas, status.available_replicas) == (2, replicas, replicas)


def test_a_json_patch_is_refused_as_unsupported(k8s: KubernetesStandIn) -> None:
    apps = client.AppsV1Api(_granted(k8s))
    with pytest.raises(ApiException) as caught:
        apps.patch_namespaced_deployment("web", NS, [{"op": "add", "path": "/metadata/labels", "value": {}}],
                                         _content_type="application/json-patch+json")
    assert caught.value.status == 415
