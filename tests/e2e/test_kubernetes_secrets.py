"""End to end: keys delivered to Kubernetes Secrets through the real pipeline — `keyrotor worker`
subprocesses on Redis and PostgreSQL, a real OpenBao, the provider stand-in, and the Kubernetes API
stand-in reached with the official client (``KEYROTOR_K8S_API_SERVER`` + token)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import PROVIDER, World, WorldFactory, render_inventory
from worker.db.session import session_scope
from worker.integrations.kube_restarts import WRITTEN_AT
from keyrotor_sandbox.kubernetes import KubernetesStandIn
from worker.secret import Secret

pytestmark = [pytest.mark.integration, pytest.mark.slow]
NS = "apps"
ROLLOUT_DELAY_S = 1.5


def _setup(world: World, keys: dict[str, dict[str, Any]]) -> KubernetesStandIn:
    """Start the API stand-in, give the workers its address and a token, declare ``keys``
    (key name → kubernetes_secret integration spec), seed each key and apply the inventory."""
    from worker.inventory.apply import apply_inventory
    from worker.inventory.loader import load_inventory

    k8s = KubernetesStandIn(rollout_delay_s=ROLLOUT_DELAY_S).start()
    world.stack.callback(k8s.stop)
    token = k8s.add_token()
    extra = {"KEYROTOR_K8S_API_SERVER": k8s.url, "KEYROTOR_K8S_TOKEN": token, "KEYROTOR_K8S_RESTART_SETTLE_S": "1",
             "KEYROTOR_K8S_ROLLOUT_POLL_S": "0.3", "KEYROTOR_STEP_MIN_BACKOFF_S": "0.2"}
    base_env = world.worker_env
    world.worker_env = lambda log_level="DEBUG": {**base_env(log_level), **extra}  # type: ignore[method-assign]

    document = render_inventory({"provider_url": world.provider.url, "consumer_url": "", "mount": world.mount},
                                grace_s=1, activation_timeout_s=20, with_consumer=False, with_copy=False)
    for key_name, integration in keys.items():
        slug = key_name.replace("/", "-")
        document["integrations"][f"k8s-{slug}"] = {"kind": "kubernetes_secret", "namespace": NS, **integration}
        path = f"apps/{slug}"
        document["keys"][key_name] = {"provider": PROVIDER, "credential_type": "api_key", "owner": "e2e@example.com",
                                      "vault": {"mount": world.mount, "path": path, "field": "api_key"},
                                      "policy": "e2e", "integrations": [f"k8s-{slug}"]}
        seed = world.provider.seed_key(f"seed-{slug}")
        world.store.promote(world.mount, path, "api_key", Secret(seed.secret), provider_key_id=seed.id,
                            expected_version=None)
        integration["seed"] = seed.secret
    inventory = world.tmp_path / "k8s-inventory.yaml"
    inventory.write_text(yaml.safe_dump({**document, "integrations": {
        name: {k: v for k, v in spec.items() if k != "seed"} for name, spec in document["integrations"].items()}}))
    with session_scope(world.engine) as session:
        apply_inventory(session, load_inventory(inventory), actor="test:e2e")
    k8s.token = token  # type: ignore[attr-defined]
    return k8s


def _vault_value(world: World, key_name: str) -> str:
    stored = world.store.read_current(world.mount, f"apps/{key_name.replace('/', '-')}", "api_key")
    assert stored is not None
    return stored.secret.reveal()


def _at(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_three_keys_of_one_deployment_rotate_in_one_batch_and_restart_it_once(make_world: WorldFactory) -> None:
    world = make_world(grace_s=1, with_consumer=False, with_copy=False)
    keys = {f"e2e/k8s-{n}": {"secret": "billing-keys", "data_key": f"KEY_{n.upper()}",
                             "workloads": [{"kind": "Deployment", "name": "web"}], "rollout_timeout": "60s"}
            for n in ("a", "b", "c")}
    k8s = _setup(world, keys)
    k8s.grant(k8s.token, NS, "secrets", ["get", "update", "patch"], ["billing-keys"])  # type: ignore[attr-defined]
    k8s.grant(k8s.token, NS, "deployments", ["get", "patch"], ["web"])  # type: ignore[attr-defined]
    k8s.add_secret(NS, "billing-keys", {"UNRELATED": "keep-me", **{s["data_key"]: s["seed"] for s in keys.values()}})
    k8s.add_workload(NS, "Deployment", "web", replicas=3)

    world.start_worker(threads=2)
    world.start_worker(threads=2)  # two processes: the batch is decided across them
    runs = {name: world.request(name, enqueue=False) for name in keys}
    for run_id in runs.values():
        world.enqueue(run_id)
    for run_id in runs.values():
        world.wait_state(run_id, ("completed",), timeout=120)

    rollouts = k8s.rollouts(NS, "Deployment", "web")
    assert len(rollouts) == 1, f"expected one restart for the batch, got {rollouts}"
    values = k8s.secret_values(NS, "billing-keys")
    assert values["UNRELATED"] == "keep-me"
    for name, spec in keys.items():
        assert values[spec["data_key"]] == _vault_value(world, name) != spec["seed"]
    # the single restart came after the last Secret write ...
    assert _at(rollouts[0].restarted_at or "") >= _at(k8s.secret_annotations(NS, "billing-keys")[WRITTEN_AT])
    # ... and every run was verified only once the rollout had finished
    rolled_out = rollouts[0].started_at.timestamp() + ROLLOUT_DELAY_S
    for run_id in runs.values():
        verified = [e.at for e in world.audit(run_id) if e.event == "state_changed" and e.to_state == "verified"]
        assert len(verified) == 1 and verified[0] is not None
        assert verified[0].timestamp() >= rolled_out, world.trail(run_id)
    assert world.leaks(world.issued_secrets()) == []


def test_a_conflict_is_retried_and_an_rbac_refusal_rolls_back_with_a_clear_error(make_world: WorldFactory) -> None:
    world = make_world(grace_s=1, with_consumer=False, with_copy=False)
    keys = {"e2e/k8s-ok": {"secret": "billing-keys", "data_key": "API_KEY"},
            "e2e/k8s-denied": {"secret": "payroll-keys", "data_key": "API_KEY"}}
    k8s = _setup(world, keys)
    k8s.grant(k8s.token, NS, "secrets", ["get", "update", "patch"], ["billing-keys"])  # type: ignore[attr-defined]
    k8s.grant(k8s.token, NS, "secrets", ["get"], ["payroll-keys"])  # type: ignore[attr-defined]  # read-only
    k8s.add_secret(NS, "billing-keys", {"API_KEY": keys["e2e/k8s-ok"]["seed"]})
    k8s.add_secret(NS, "payroll-keys", {"API_KEY": keys["e2e/k8s-denied"]["seed"], "OTHER": "keep"})
    k8s.concurrent_write_after_next_read(NS, "billing-keys", "WRITTEN_BY_ANOTHER_CONTROLLER", "yes")

    world.start_worker(threads=2)
    ok = world.request("e2e/k8s-ok")
    denied = world.request("e2e/k8s-denied")
    world.wait_state(ok, ("completed",), timeout=90)
    world.wait_state(denied, ("rolled_back", "needs_attention"), timeout=90)

    puts = [(path, status) for method, path, status in k8s.requests if method == "PUT" and path.endswith("/billing-keys")]
    assert puts[0][1] == 409 and puts[-1][1] == 200
    billing = k8s.secret_values(NS, "billing-keys")
    assert billing == {"API_KEY": _vault_value(world, "e2e/k8s-ok"), "WRITTEN_BY_ANOTHER_CONTROLLER": "yes"}

    assert world.state(denied) == "rolled_back"   # nothing had landed: the rollback needed no write
    failure = next(e for e in world.audit(denied) if e.event == "state_changed" and e.to_state == "rolling_back")
    message = world.run(denied).last_error or ""
    assert "403 Forbidden" in message and "Secret apps/payroll-keys" in message and "may not update secrets" in message, \
        world.trail(denied)
    assert failure is not None
    assert k8s.secret_values(NS, "payroll-keys") == {"API_KEY": keys["e2e/k8s-denied"]["seed"], "OTHER": "keep"}
    assert _vault_value(world, "e2e/k8s-denied") == keys["e2e/k8s-denied"]["seed"]   # Vault rolled back too
    assert world.leaks(world.issued_secrets()) == []
