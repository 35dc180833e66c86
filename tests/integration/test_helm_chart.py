"""The Helm chart, rendered and linted by the real Helm library (helm-python-sdk, no helm binary),
every document validated by kubernetes-validate (strict), and checked against the Pod Security
Standards "restricted" profile and the "no secret value in a manifest" invariant (DESIGN.md #5).

The tools are in the `test` extra: outside CI a missing one skips these tests, in CI it fails them.
"""

from __future__ import annotations

import copy
import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "keyrotor"
EXAMPLE_INVENTORY = ROOT / "config" / "keyrotor.example.yaml"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
RELEASE, NAMESPACE = "rel", "keyrotor-test"
FULLNAME = f"{RELEASE}-keyrotor"
# The oldest Kubernetes the chart claims (Chart.yaml kubeVersion is >=1.25, but 1.30 is the oldest
# still supported upstream) and the newest schema set kubernetes-validate ships.
KUBE_VERSIONS = ("1.30.0", None)


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        if IN_CI:
            pytest.fail(f"{module} is missing: install the test extra (pip install -e '.[test]')", pytrace=False)
        pytest.skip(f"{module} is not installed")


@pytest.fixture(scope="module")
def helm() -> Any:
    return _require("helm_python")


@pytest.fixture(scope="module")
def kv() -> Any:
    _require("kubernetes_validate")
    import kubernetes_validate.utils as utils

    return utils


@pytest.fixture(scope="module")
def chart(helm: Any) -> Iterator[Any]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: Any, values: dict[str, Any] | None = None, release: str = RELEASE) -> list[dict[str, Any]]:
    """Render like `helm template` (install) and return the Kubernetes documents."""
    out = chart.render(values or {}, name=release, namespace=NAMESPACE, is_install=True)
    docs: list[dict[str, Any]] = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("metadata", {}).setdefault("annotations", {})
                docs.append(doc)
    return docs


def render_text(chart: Any, values: dict[str, Any] | None = None) -> str:
    out = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return "\n".join(out.values())


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, got {[d['metadata']['name'] for d in find(docs, kind)]}"
    return found[0]


def pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(kind/name, pod template metadata, pod spec) of every workload."""
    out = []
    for d in docs:
        if d["kind"] == "Pod":
            out.append((f"Pod/{d['metadata']['name']}", d["metadata"], d["spec"]))
        if d["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            tpl = d["spec"]["template"]
            out.append((f"{d['kind']}/{d['metadata']['name']}", tpl.get("metadata", {}), tpl["spec"]))
        elif d["kind"] == "CronJob":
            tpl = d["spec"]["jobTemplate"]["spec"]["template"]
            out.append((f"CronJob/{d['metadata']['name']}", tpl.get("metadata", {}), tpl["spec"]))
    return out


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    names = [e["name"] for e in container.get("env", [])]
    assert len(names) == len(set(names)), f"duplicate env vars in {container['name']}: {names}"
    return {e["name"]: e for e in container.get("env", [])}


def example_inventory() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE_INVENTORY.read_text())


# ------------------------------------------------------------------------------ value sets
SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "hpa": {"worker": {"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 12,
                                       "targetMemoryUtilizationPercentage": 80}}},
    "servicemonitor": {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}}},
    "vault-token": {"vault": {"auth": {"method": "token", "token": {"existingSecret": "vault-token", "key": "tok"}}}},
    "no-networkpolicy": {"networkPolicy": {"enabled": False}},
    "inventory-text": {"config": {"inventory": "TEXT"}, "hooks": {"migrate": {"enabled": False}}},
    "full": {
        "image": {"digest": "sha256:" + "ab" * 32},
        "imagePullSecrets": [{"name": "regcred"}],
        "database": {"existingSecret": "pg-credentials", "key": "dsn"},
        "redis": {"existingSecret": "redis-credentials", "key": "redis-url"},
        "vault": {"namespace": "team-a", "tls": {"caConfigMap": "vault-ca"},
                  "auth": {"kubernetes": {"role": "keyrotor-prod", "audience": "vault"}}},
        "config": {"inventory": "EXAMPLE"},
        "hooks": {"configApply": {"prune": True}},
        "extraEnv": [{"name": "SLACK_WEBHOOK_URL",
                      "valueFrom": {"secretKeyRef": {"name": "notify", "key": "slack"}}},
                     {"name": "TZ", "value": "UTC"}],
        "metrics": {"serviceMonitor": {"enabled": True},
                    },
        "networkPolicy": {"metricsFrom": [{"namespaceSelector": {"matchLabels": {
            "kubernetes.io/metadata.name": "monitoring"}}}]},
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                       "whenUnsatisfiable": "ScheduleAnyway"}],
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "security", "effect": "NoSchedule"}],
        "scheduler": {"nodeSelector": {"kubernetes.io/os": "linux"}},
        "podAnnotations": {"team": "platform"},
        "priorityClassName": "keyrotor-high",
    },
    # Operations: KEDA, alerts, dashboard, extra volumes/sidecars/init containers/objects,
    # overridden probes, PgBouncer, a connection budget; the helm test Pod is on by default.
    "ops": {
        "worker": {"keda": {"enabled": True, "maxReplicaCount": 6, "authenticationRef": "redis-auth"}},
        "redis": {"url": "redis://redis-master.data.svc:6380/2"},
        "metrics": {"serviceMonitor": {"enabled": True},
                    "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}},
                    "grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "keyrotor"}}},
        "extraVolumes": [{"name": "provider-ca", "configMap": {"name": "corp-ca"}}],
        "extraVolumeMounts": [{"name": "provider-ca", "mountPath": "/etc/ssl/corp", "readOnly": True}],
        "extraEnv": [{"name": "SSL_CERT_FILE", "value": "/etc/ssl/corp/ca.crt"}],
        "extraContainers": [{"name": "sql-proxy", "image": "gcr.io/cloud-sql-connectors/cloud-sql-proxy:2.11.0",
                             "args": ["--port=5432", "project:region:db"],
                             "resources": {"requests": {"cpu": "10m", "memory": "32Mi"},
                                           "limits": {"cpu": "100m", "memory": "64Mi"}}}],
        "initContainers": [{"name": "wait-for-proxy", "image": "busybox:1.36", "command": ["sh", "-c", "true"],
                            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"},
                                          "limits": {"cpu": "50m", "memory": "32Mi"}}}],
        "extraObjects": [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "{{ .Release.Name }}-extra"},
                          "data": {"release": "{{ .Release.Name }}"}},
                         "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-extra-text\ndata: {a: b}\n"],
        "probes": {"liveness": {"exec": {"command": ["keyrotor", "--version"]}, "periodSeconds": 30},
                   "readiness": {"enabled": False}},
        "database": {"pool": {"workerSize": 6}, "maxConnections": 200, "pgbouncer": True},
    },
    # Redis Sentinel: the URL names the sentinels and the master; KEDA scales on redis-sentinel triggers.
    "sentinel": {
        "redis": {"url": "redis+sentinel://redis-node-0.redis-headless:26379,redis-node-1.redis-headless/mymaster/3"},
        "worker": {"keda": {"enabled": True, "authenticationRef": "redis-auth"}},
        "networkPolicy": {"egress": {"redis": {"ports": [6379, 26379]}}},
    },
    # kubernetes_secret integrations: per namespace a Role + RoleBinding, an API-server token for
    # the worker, egress to the API server.
    "kubernetes-secrets": {
        "kubernetesSecrets": [
            {"namespace": "billing", "secrets": ["billing-api-keys", "billing-extra"],
             "workloads": [{"kind": "Deployment", "name": "billing-api"}, {"kind": "StatefulSet", "name": "billing-worker"}]},
            {"namespace": "reports", "secrets": ["reports-keys"]},
        ],
        "networkPolicy": {"apiServer": {"cidrs": ["10.96.0.1/32", "172.20.0.0/28"], "ports": [443, 6443]}},
    },
}


def scenario(name: str) -> dict[str, Any]:
    values = copy.deepcopy(SCENARIOS[name])
    if values.get("config", {}).get("inventory") == "EXAMPLE":
        values["config"]["inventory"] = example_inventory()
    elif values.get("config", {}).get("inventory") == "TEXT":
        values["config"]["inventory"] = EXAMPLE_INVENTORY.read_text()
    return values


# ------------------------------------------------------------------------------ lint
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_helm_lint_strict_has_no_warning(helm: Any, name: str) -> None:
    report = helm.lint(CHART, scenario(name), strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    assert report["total_charts_linted"] == 1
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], problems or report["errors"]


def test_lint_reports_schema_violation(helm: Any) -> None:
    # The lint wrapper must surface a schema failure, or the lint test above proves nothing.
    report = helm.lint(CHART, {"worker": {"threads": 0}}, strict=True)
    assert any("/worker/threads" in m["error"] for m in report["messages"] if m["severity"] == 3)


# ------------------------------------------------------------------------------ Kubernetes schemas
# The Prometheus Operator CRD is not in kubernetes-validate; check what the operator requires.
SERVICEMONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "properties": {"matchLabels": {"type": "object"}},
                             "additionalProperties": False},
                "namespaceSelector": {"type": "object"},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "jobLabel": {"type": "string"},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                   "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                                   "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"}},
                    "required": ["port"]}},
            },
        },
    },
}


# KEDA's ScaledObject (keda.sh/v1alpha1) with redis triggers: the fields KEDA reads.
SCALEDOBJECT_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {"type": "object", "required": ["scaleTargetRef", "triggers"], "additionalProperties": False,
                 "properties": {
                     "scaleTargetRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                                        "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                                       "name": {"type": "string"}}},
                     "minReplicaCount": {"type": "integer"}, "maxReplicaCount": {"type": "integer"},
                     "pollingInterval": {"type": "integer"}, "cooldownPeriod": {"type": "integer"},
                     "triggers": {"type": "array", "minItems": 1, "items": {
                         "type": "object", "required": ["type", "metadata"], "additionalProperties": False,
                         "properties": {"type": {"enum": ["redis", "redis-sentinel"]},
                                        "metadata": {"type": "object", "required": ["listName", "listLength"],
                                                     "anyOf": [{"required": ["address"]},
                                                               {"required": ["addresses", "sentinelMaster"]}],
                                                     "additionalProperties": {"type": "string"}},
                                        "authenticationRef": {"type": "object", "required": ["name"]}}}}}},
    },
}
# Prometheus Operator's PrometheusRule: groups of named rules with alert/record and expr.
PROMETHEUSRULE_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {"type": "object", "required": ["groups"], "additionalProperties": False, "properties": {"groups": {
            "type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["name", "rules"], "properties": {"rules": {"type": "array", "items": {
                    "type": "object", "required": ["expr"], "additionalProperties": False,
                    "properties": {"alert": {"type": "string"}, "record": {"type": "string"}, "expr": {"type": "string"},
                                   "for": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h|d|w|y)$"},
                                   "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                                   "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}}}}}}},
    },
}
CRD_SCHEMAS = {"ServiceMonitor": SERVICEMONITOR_SCHEMA, "ScaledObject": SCALEDOBJECT_SCHEMA,
               "PrometheusRule": PROMETHEUSRULE_SCHEMA}


def test_every_rendered_document_is_valid_kubernetes(chart: Any, kv: Any) -> None:
    import jsonschema

    validated = 0
    kinds: set[str] = set()
    for name in SCENARIOS:
        for doc in render(chart, scenario(name)):
            kinds.add(doc["kind"])
            if doc["kind"] in CRD_SCHEMAS:
                jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])
                validated += 1
                continue
            for version in KUBE_VERSIONS:
                try:
                    kv.validate(doc, version or kv.latest_version(), strict=True)
                except kv.ValidationError as exc:
                    pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']} is invalid for "
                                f"Kubernetes {version or kv.latest_version()}: {exc.message} at "
                                f"{'.'.join(map(str, exc.path))}")
                validated += 1
    expected = {"Deployment", "Job", "ConfigMap", "Service", "ServiceAccount", "PodDisruptionBudget",
                "HorizontalPodAutoscaler", "NetworkPolicy", "ServiceMonitor", "ScaledObject", "PrometheusRule", "Pod",
                "Role", "RoleBinding"}
    assert expected <= kinds, f"scenarios never rendered {expected - kinds}"
    assert validated > 80, validated


def test_strict_validation_catches_a_bad_document(kv: Any) -> None:
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
           "spec": {"selector": {}, "template": {"spec": {"containers": [{"name": "c", "imagePullPolicy": "Sometimes",
                                                                          "unknownField": 1}]}}}}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, "1.30.0", strict=True)


# ------------------------------------------------------------------------------ Pod Security Standards
RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                           "persistentVolumeClaim", "projected", "secret"}
# Capabilities baseline/restricted let a container add back: only NET_BIND_SERVICE.
ALLOWED_ADD = {"NET_BIND_SERVICE"}


def restricted_violations(where: str, pod: dict[str, Any]) -> list[str]:
    """The Pod Security Standards baseline + restricted checks for one pod spec."""
    bad: list[str] = []
    psc = pod.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            bad.append(f"{where}: {key}")
    for vol in pod.get("volumes", []):
        kinds = set(vol) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            bad.append(f"{where}: volume {vol['name']} of type {kinds - RESTRICTED_VOLUME_TYPES}")
    if psc.get("seccompProfile", {}).get("type") not in {"RuntimeDefault", "Localhost"}:
        bad.append(f"{where}: pod seccompProfile is not RuntimeDefault/Localhost")
    if psc.get("runAsUser") == 0:
        bad.append(f"{where}: pod runAsUser 0")
    if pod.get("automountServiceAccountToken") is not False:
        bad.append(f"{where}: automountServiceAccountToken is not false")
    containers = pod.get("containers", []) + pod.get("initContainers", []) + pod.get("ephemeralContainers", [])
    assert containers, where
    for c in containers:
        sc = c.get("securityContext", {})
        cw = f"{where}/{c['name']}"
        if sc.get("privileged"):
            bad.append(f"{cw}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{cw}: allowPrivilegeEscalation is not false")
        if not (sc.get("runAsNonRoot") is True or psc.get("runAsNonRoot") is True):
            bad.append(f"{cw}: runAsNonRoot is not true")
        if sc.get("runAsUser") == 0:
            bad.append(f"{cw}: runAsUser 0")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            bad.append(f"{cw}: capabilities do not drop ALL")
        if set(sc.get("capabilities", {}).get("add", [])) - ALLOWED_ADD:
            bad.append(f"{cw}: adds capabilities")
        seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
        if seccomp not in {"RuntimeDefault", "Localhost"}:
            bad.append(f"{cw}: seccompProfile {seccomp}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            bad.append(f"{cw}: hostPort")
        # This chart's own rules on top of the profile.
        if sc.get("readOnlyRootFilesystem") is not True:
            bad.append(f"{cw}: root filesystem is writable")
        if sc.get("runAsUser", psc.get("runAsUser")) != 10001:
            bad.append(f"{cw}: does not run as UID 10001")
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            if not {"cpu", "memory"} <= set(res.get(kind, {})):
                bad.append(f"{cw}: resources.{kind} lacks cpu/memory")
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        tmp = next((v for v in pod.get("volumes", []) if v["name"] == mounts.get("/tmp")), None)
        if not tmp or "emptyDir" not in tmp:
            bad.append(f"{cw}: /tmp is not an emptyDir")
    return bad


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_pod_meets_restricted_profile(chart: Any, name: str) -> None:
    docs = render(chart, scenario(name))
    specs = pod_specs(docs)
    names = {w for w, _, _ in specs}
    assert {f"Deployment/{FULLNAME}-worker", f"Deployment/{FULLNAME}-scheduler"} <= names
    assert (f"Job/{FULLNAME}-migrate" in names) == (name != "inventory-text")
    assert (f"Job/{FULLNAME}-config-apply" in names) == (name in {"full", "inventory-text"})
    problems = [p for w, _, spec in specs for p in restricted_violations(w, spec)]
    assert not problems, problems


def test_restricted_checker_catches_violations() -> None:
    # Guards the checker itself: a pod that breaks the profile must be reported.
    pod = {"hostNetwork": True, "securityContext": {}, "volumes": [{"name": "h", "hostPath": {"path": "/"}}],
           "containers": [{"name": "c", "securityContext": {"privileged": True,
                                                            "capabilities": {"add": ["SYS_ADMIN"]}}}]}
    found = " ".join(restricted_violations("pod", pod))
    for expected in ("hostNetwork", "hostPath", "seccompProfile", "privileged", "allowPrivilegeEscalation",
                     "runAsNonRoot", "drop ALL", "adds capabilities", "automountServiceAccountToken",
                     "writable", "/tmp"):
        assert expected in found, expected


@pytest.mark.parametrize("bad", [
    {"containerSecurityContext": {"allowPrivilegeEscalation": True}},
    {"containerSecurityContext": {"privileged": True}},
    {"containerSecurityContext": {"readOnlyRootFilesystem": False}},
    {"containerSecurityContext": {"capabilities": {"drop": ["NET_RAW"]}}},
    {"containerSecurityContext": {"capabilities": {"drop": ["ALL"], "add": ["SYS_ADMIN"]}}},
    {"podSecurityContext": {"runAsNonRoot": False}},
    {"podSecurityContext": {"runAsUser": 0}},
    {"podSecurityContext": {"seccompProfile": {"type": "Unconfined"}}},
])
def test_schema_refuses_weakening_the_security_context(chart: Any, helm: Any, bad: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError) as err:
        render(chart, bad)
    section = next(iter(bad))
    assert f"/{section}/" in str(err.value), str(err.value)


# ------------------------------------------------------------------------------ schema
@pytest.mark.parametrize(("bad", "where"), [
    ({"worker": {"processes": 0}}, "/worker/processes"),
    ({"worker": {"threads": "four"}}, "/worker/threads"),
    ({"worker": {"replica": 3}}, "/worker"),                      # typo of replicas
    ({"image": {"digest": "latest"}}, "/image/digest"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"logLevel": "VERBOSE"}, "/logLevel"),
    ({"vault": {"auth": {"method": "approle"}}}, "/vault/auth/method"),
    ({"vault": {"address": "vault:8200"}}, "/vault/address"),
    ({"metrics": {"port": 70000}}, "/metrics/port"),
    ({"scheduler": {"resources": {"requests": {"cpu": "1 core"}, "limits": {}}}}, "/scheduler/resources"),
    ({"database": {"url": "postgresql://u:p@db/x"}}, "/database"),  # no inline URL exists, by design
    ({"networkPolicy": {"egress": {"redis": {"ports": ["redis"]}}}}, "/networkPolicy/egress/redis/ports"),
])
def test_schema_refuses_bad_values_with_a_clear_message(chart: Any, helm: Any, bad: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmValuesError) as err:
        render(chart, bad)
    assert where in str(err.value), str(err.value)


def test_schema_accepts_every_scenario(chart: Any) -> None:
    for name in SCENARIOS:
        chart.validate_schema(chart.merge_values(scenario(name)))


# ------------------------------------------------------------------------------ secrets
SENSITIVE_ENV = re.compile(r"(PASSWORD|TOKEN|SECRET|DATABASE_URL|API_?KEY|CREDENTIAL)", re.I)
URL_WITH_PASSWORD = re.compile(r"://[^/\s@:]+:[^/\s@]+@")


def test_no_secret_value_is_rendered(chart: Any) -> None:
    """Point every secret at an existing Secret; only names and keys may appear in the output."""
    values = scenario("full")
    values["vault"]["auth"] = {"method": "token", "token": {"existingSecret": "vault-token-secret", "key": "vt"}}
    docs = render(chart, values)
    text = render_text(chart, values)

    assert not find(docs, "Secret"), "the chart must never create a Secret (it would carry a value)"
    assert not URL_WITH_PASSWORD.search(text), URL_WITH_PASSWORD.search(text)
    refs: dict[str, tuple[str, str]] = {}
    for where, _, spec in pod_specs(docs):
        for c in spec["containers"]:
            for name, e in env_of(c).items():
                if SENSITIVE_ENV.search(name) or name == "KEYROTOR_REDIS_URL":
                    assert "value" not in e, f"{where}: {name} has a literal value"
                    ref = e["valueFrom"]["secretKeyRef"]
                    refs[name] = (ref["name"], ref["key"])
    assert refs["KEYROTOR_DATABASE_URL"] == ("pg-credentials", "dsn")
    assert refs["KEYROTOR_REDIS_URL"] == ("redis-credentials", "redis-url")
    assert refs["VAULT_TOKEN"] == ("vault-token-secret", "vt")
    for cm in find(docs, "ConfigMap"):
        for blob in cm["data"].values():
            assert not URL_WITH_PASSWORD.search(blob)


def test_inventory_configmap_carries_references_only(chart: Any) -> None:
    docs = render(chart, scenario("full"))
    cm = one(docs, "ConfigMap", f"{FULLNAME}-inventory")
    rendered = yaml.safe_load(cm["data"]["inventory.yaml"])
    assert rendered == example_inventory()  # the document round-trips unchanged
    token = rendered["providers"]["alloy"]["auth"]["token"]
    assert token == {"vault": "secret/keyrotor/providers/alloy#admin_token"}
    hook_cm = one(docs, "ConfigMap", f"{FULLNAME}-inventory-hook")
    assert hook_cm["data"] == cm["data"]


@pytest.mark.parametrize(("values", "message"), [
    ({"redis": {"url": "redis://:hunter2@redis:6379/0"}}, "redis.existingSecret"),
    ({"redis": {"url": "redis+sentinel://:hunter2@s1:26379,s2:26379/mymaster/0"}}, "redis.existingSecret"),
    ({"redis": {"url": "redis+sentinel://s1:26379,s2:26379/mymaster/0?sentinel_password=hunter2"}},
     "redis.existingSecret"),
    ({"extraEnv": [{"name": "PROVIDER_API_TOKEN", "value": "hunter2"}]}, "valueFrom.secretKeyRef"),
    ({"vault": {"auth": {"method": "token"}}}, "vault.auth.token.existingSecret"),
    ({"vault": {"auth": {"kubernetes": {"role": ""}}}}, "vault.auth.kubernetes.role"),
])
def test_values_that_would_leak_or_break_auth_are_refused(chart: Any, helm: Any, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError) as err:
        render(chart, values)
    assert message in str(err.value)
    assert "hunter2" not in str(err.value)


# ------------------------------------------------------------------------------ Vault auth
def test_vault_kubernetes_auth_uses_a_projected_token_only(chart: Any) -> None:
    docs = render(chart, scenario("full"))
    for comp in ("worker", "scheduler"):
        spec = one(docs, "Deployment", f"{FULLNAME}-{comp}")["spec"]["template"]["spec"]
        assert spec["automountServiceAccountToken"] is False
        assert spec["serviceAccountName"] == FULLNAME
        vols = {v["name"]: v for v in spec["volumes"]}
        source = vols["vault-token"]["projected"]["sources"][0]["serviceAccountToken"]
        assert source["audience"] == "vault" and source["path"] == "token"
        c = spec["containers"][0]
        env = env_of(c)
        assert env["KEYROTOR_VAULT_K8S_ROLE"]["value"] == "keyrotor-prod"
        mount = next(m for m in c["volumeMounts"] if m["name"] == "vault-token")
        assert env["KEYROTOR_VAULT_K8S_JWT_PATH"]["value"] == mount["mountPath"] + "/token"
        assert "VAULT_TOKEN" not in env
        assert env["VAULT_CACERT"]["value"].startswith(next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "vault-ca"))
        assert vols["vault-ca"]["configMap"]["name"] == "vault-ca"
    sa = one(docs, "ServiceAccount", FULLNAME)
    assert sa["automountServiceAccountToken"] is False


def test_vault_token_auth_mounts_no_service_account_token(chart: Any) -> None:
    docs = render(chart, scenario("vault-token"))
    for _, _, spec in pod_specs(docs):
        assert all("projected" not in v for v in spec["volumes"])
    worker = one(docs, "Deployment", f"{FULLNAME}-worker")["spec"]["template"]["spec"]["containers"][0]
    env = env_of(worker)
    assert env["VAULT_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "vault-token", "key": "tok"}
    assert "KEYROTOR_VAULT_K8S_ROLE" not in env


def test_hook_jobs_get_no_vault_access(chart: Any) -> None:
    for name in ("full", "vault-token"):
        for where, _, spec in pod_specs(render(chart, scenario(name))):
            if where.startswith("Job/"):
                env = env_of(spec["containers"][0])
                assert not {k for k in env if "VAULT" in k}, where
                assert env["KEYROTOR_METRICS_PORT"]["value"] == "0"


# ------------------------------------------------------------------------------ workloads
def test_worker_and_scheduler_commands_probes_and_ports(chart: Any) -> None:
    docs = render(chart, {"worker": {"processes": 3, "threads": 6, "replicas": 4}, "metrics": {"port": 9200}})
    worker = one(docs, "Deployment", f"{FULLNAME}-worker")
    assert worker["spec"]["replicas"] == 4
    assert one(docs, "Deployment", f"{FULLNAME}-scheduler")["spec"]["replicas"] == 2
    for comp, args in (("worker", ["worker", "--processes", "3", "--threads", "6"]), ("scheduler", ["scheduler"])):
        c = one(docs, "Deployment", f"{FULLNAME}-{comp}")["spec"]["template"]["spec"]["containers"][0]
        assert c["args"] == args
        assert "command" not in c  # the image's ENTRYPOINT is `keyrotor`
        assert c["ports"] == [{"name": "metrics", "containerPort": 9200, "protocol": "TCP"}]
        assert env_of(c)["KEYROTOR_METRICS_PORT"]["value"] == "9200"
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            assert c[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    svc = one(docs, "Service", f"{FULLNAME}-metrics")
    assert svc["spec"]["ports"][0]["port"] == 9200


def test_hooks_run_migration_then_config_apply_before_the_release(chart: Any) -> None:
    docs = render(chart, scenario("full"))
    migrate = one(docs, "Job", f"{FULLNAME}-migrate")
    apply = one(docs, "Job", f"{FULLNAME}-config-apply")
    hook_cm = one(docs, "ConfigMap", f"{FULLNAME}-inventory-hook")
    for d in (migrate, apply, hook_cm):
        assert d["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    weight = {d["metadata"]["name"]: int(d["metadata"]["annotations"]["helm.sh/hook-weight"])
              for d in (migrate, apply, hook_cm)}
    assert weight[hook_cm["metadata"]["name"]] < weight[migrate["metadata"]["name"]] < weight[apply["metadata"]["name"]]
    assert migrate["spec"]["template"]["spec"]["containers"][0]["args"] == ["db", "upgrade"]
    spec = apply["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert c["args"] == ["config", "apply", "/etc/keyrotor/inventory.yaml", "--prune"]
    assert env_of(c)["KEYROTOR_CONFIG"]["value"] == "/etc/keyrotor/inventory.yaml"
    # On install the release's ConfigMap does not exist yet: the Job must read the hook copy.
    inv = next(v for v in spec["volumes"] if v["name"] == "inventory")
    assert inv["configMap"]["name"] == hook_cm["metadata"]["name"]
    assert spec["restartPolicy"] == "Never"
    # Hook pods run before the chart's ServiceAccount exists; they must not depend on it.
    assert "serviceAccountName" not in spec
    # Without an inventory there is nothing to apply.
    assert not find(render(chart, {}), "Job", f"{FULLNAME}-config-apply")


def test_inventory_checksum_rolls_pods_only_when_inventory_changes(chart: Any) -> None:
    def checksums(inventory: dict[str, Any]) -> set[str]:
        docs = render(chart, {"config": {"inventory": inventory}})
        return {one(docs, "Deployment", f"{FULLNAME}-{c}")["spec"]["template"]["metadata"]["annotations"]["checksum/inventory"]
                for c in ("worker", "scheduler")}

    inv = example_inventory()
    first, again = checksums(inv), checksums(copy.deepcopy(inv))
    changed = copy.deepcopy(inv)
    changed["policies"]["standard"]["grace_period"] = "2h"
    assert len(first) == 1 and first == again
    assert checksums(changed) != first


def test_hpa_owns_worker_replicas(chart: Any) -> None:
    docs = render(chart, scenario("hpa"))
    hpa = one(docs, "HorizontalPodAutoscaler", f"{FULLNAME}-worker")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"{FULLNAME}-worker"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    assert {m["resource"]["name"] for m in hpa["spec"]["metrics"]} == {"cpu", "memory"}
    assert "replicas" not in one(docs, "Deployment", f"{FULLNAME}-worker")["spec"]
    assert not find(render(chart, {}), "HorizontalPodAutoscaler")


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_metrics_service_and_servicemonitor_select_worker_and_scheduler_only(chart: Any) -> None:
    docs = render(chart, scenario("full"))
    svc = one(docs, "Service", f"{FULLNAME}-metrics")
    selected = {w for w, meta, _ in pod_specs(docs) if selects(svc["spec"]["selector"], meta["labels"])}
    assert selected == {f"Deployment/{FULLNAME}-worker", f"Deployment/{FULLNAME}-scheduler"}
    sm = one(render(chart, scenario("servicemonitor")), "ServiceMonitor", FULLNAME)
    assert selects(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]
    assert not find(render(chart, {}), "ServiceMonitor")


def test_pdbs_select_their_component(chart: Any) -> None:
    docs = render(chart, {})
    for comp in ("worker", "scheduler"):
        pdb = one(docs, "PodDisruptionBudget", f"{FULLNAME}-{comp}")
        dep = one(docs, "Deployment", f"{FULLNAME}-{comp}")
        assert pdb["spec"]["selector"] == dep["spec"]["selector"]
        assert pdb["spec"]["maxUnavailable"] == 1


def test_network_policy_limits_egress_to_dependencies(chart: Any) -> None:
    docs = render(chart, scenario("full"))
    np_ = one(docs, "NetworkPolicy", FULLNAME)
    spec = np_["spec"]
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    for where, meta, _ in pod_specs(docs):  # hook Jobs are covered too
        assert selects(spec["podSelector"]["matchLabels"], meta["labels"]), where
    ports = {(p["port"], p.get("protocol", "TCP")) for rule in spec["egress"] for p in rule.get("ports", [])}
    assert {(53, "UDP"), (53, "TCP"), (6379, "TCP"), (5432, "TCP"), (8200, "TCP"), (443, "TCP")} <= ports
    assert all(rule.get("ports") for rule in spec["egress"]), "an egress rule without ports opens every port"
    https = next(r for r in spec["egress"] if r["ports"] == [{"port": 443, "protocol": "TCP"}])
    block = https["to"][0]["ipBlock"]
    assert ipaddress.ip_network("10.1.2.0/24").subnet_of(ipaddress.ip_network(block["except"][0]))
    assert spec["ingress"] == [{"ports": [{"port": "metrics", "protocol": "TCP"}],
                                "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]}]
    assert not find(render(chart, scenario("no-networkpolicy")), "NetworkPolicy")


def test_standard_labels_on_every_object(chart: Any) -> None:
    for name in SCENARIOS:
        for d in render(chart, scenario(name)):
            labels = d["metadata"]["labels"]
            for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                        "app.kubernetes.io/managed-by", "helm.sh/chart"):
                assert key in labels, f"{name}: {d['kind']}/{d['metadata']['name']} lacks {key}"
            if d["kind"] in ("Role", "RoleBinding"):  # kubernetesSecrets: in the Secrets' namespaces
                assert d["metadata"]["namespace"] in {e["namespace"] for e in scenario(name)["kubernetesSecrets"]}
            else:
                assert d["metadata"]["namespace"] == NAMESPACE
            assert len(d["metadata"]["name"]) <= 63


def test_long_release_names_still_fit_dns_labels(chart: Any) -> None:
    docs = render(chart, scenario("full"), release="r" * 53)  # 53: Helm's longest release name
    assert len(docs) > 10
    for d in docs:
        assert len(d["metadata"]["name"]) <= 63, d["metadata"]["name"]


def test_image_by_tag_or_digest(chart: Any) -> None:
    def image(values: dict[str, Any]) -> str:
        return one(render(chart, values), "Deployment", f"{FULLNAME}-worker")["spec"]["template"]["spec"]["containers"][0]["image"]

    app_version = chart.metadata["appVersion"]
    assert image({}) == f"ghcr.io/keyrotor/keyrotor:{app_version}"
    assert image({"image": {"tag": "1.2.3"}}) == "ghcr.io/keyrotor/keyrotor:1.2.3"
    digest = "sha256:" + "0f" * 32
    assert image({"image": {"tag": "1.2.3", "digest": digest}}) == f"ghcr.io/keyrotor/keyrotor@{digest}"


def test_placement_settings_reach_pods(chart: Any) -> None:
    docs = render(chart, scenario("full"))
    worker = one(docs, "Deployment", f"{FULLNAME}-worker")["spec"]["template"]
    sched = one(docs, "Deployment", f"{FULLNAME}-scheduler")["spec"]["template"]
    tsc = worker["spec"]["topologySpreadConstraints"][0]
    assert tsc["labelSelector"]["matchLabels"] == one(docs, "Deployment", f"{FULLNAME}-worker")["spec"]["selector"]["matchLabels"]
    assert sched["spec"]["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "scheduler"
    assert worker["spec"]["tolerations"][0]["key"] == "dedicated"
    assert sched["spec"]["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert "nodeSelector" not in worker["spec"]
    assert worker["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert worker["spec"]["priorityClassName"] == "keyrotor-high"
    assert worker["metadata"]["annotations"]["team"] == "platform"
    env = env_of(worker["spec"]["containers"][0])
    assert env["SLACK_WEBHOOK_URL"]["valueFrom"]["secretKeyRef"]["name"] == "notify"
    assert env["VAULT_NAMESPACE"]["value"] == "team-a"


def test_inventory_given_as_file_text_keeps_its_comments(chart: Any) -> None:
    text = EXAMPLE_INVENTORY.read_text()  # what `--set-file config.inventory=FILE` passes
    docs = render(chart, {"config": {"inventory": text}})
    data = one(docs, "ConfigMap", f"{FULLNAME}-inventory")["data"]["inventory.yaml"]
    assert data.rstrip("\n") == text.rstrip("\n")
    assert yaml.safe_load(data) == example_inventory()
    assert one(docs, "ConfigMap", f"{FULLNAME}-inventory-hook")["data"]["inventory.yaml"] == data
    worker = one(docs, "Deployment", f"{FULLNAME}-worker")["spec"]["template"]["metadata"]
    assert "checksum/inventory" in worker["annotations"]


# ------------------------------------------------------------------------------ operations
def test_keda_scales_workers_on_the_dramatiq_queue_lists(chart: Any, helm: Any) -> None:
    from worker.queues import REQUEST_QUEUE, STEP_QUEUE
    from worker.queue_metrics import queue_keys

    docs = render(chart, scenario("ops"))
    so = one(docs, "ScaledObject", f"{FULLNAME}-worker")
    assert so["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"{FULLNAME}-worker"}
    assert so["spec"]["maxReplicaCount"] == 6
    lists = [t["metadata"]["listName"] for t in so["spec"]["triggers"]]
    # The lists Dramatiq's Redis broker keeps for our queues (the namespace is the queue namespace).
    assert lists == [queue_keys("keyrotor", STEP_QUEUE)["ready"], queue_keys("keyrotor", REQUEST_QUEUE)["ready"]]
    for t in so["spec"]["triggers"]:
        assert t["metadata"]["address"] == "redis-master.data.svc:6380"
        assert t["metadata"]["databaseIndex"] == "2"
        assert t["authenticationRef"] == {"name": "redis-auth"}
    assert "replicas" not in one(docs, "Deployment", f"{FULLNAME}-worker")["spec"]  # KEDA owns the count
    assert not find(docs, "HorizontalPodAutoscaler")
    custom = render(chart, {"queueNamespace": "kr-prod", "worker": {"keda": {"enabled": True}}})
    so = one(custom, "ScaledObject", f"{FULLNAME}-worker")
    assert [t["metadata"]["listName"] for t in so["spec"]["triggers"]] == ["kr-prod:rotation", "kr-prod:rotation_requests"]
    assert so["spec"]["triggers"][0]["metadata"]["address"] == "redis-master:6379"
    assert so["spec"]["triggers"][0]["metadata"]["databaseIndex"] == "0"
    assert not find(render(chart, {}), "ScaledObject")
    for bad, message in (({"worker": {"keda": {"enabled": True}, "autoscaling": {"enabled": True}}}, "enable only one"),
                         ({"worker": {"keda": {"enabled": True}}, "redis": {"existingSecret": "r"}}, "worker.keda.address")):
        with pytest.raises(helm.HelmError) as err:
            render(chart, bad)
        assert message in str(err.value)


def test_keda_with_redis_sentinel_uses_redis_sentinel_triggers(chart: Any, helm: Any) -> None:
    docs = render(chart, scenario("sentinel"))
    so = one(docs, "ScaledObject", f"{FULLNAME}-worker")
    for trigger, queue in zip(so["spec"]["triggers"], ["rotation", "rotation_requests"]):
        assert trigger["type"] == "redis-sentinel"
        assert trigger["metadata"]["addresses"] == "redis-node-0.redis-headless:26379,redis-node-1.redis-headless:26379"
        assert trigger["metadata"]["sentinelMaster"] == "mymaster"
        assert trigger["metadata"]["databaseIndex"] == "3"
        assert trigger["metadata"]["listName"] == f"keyrotor:{queue}"
        assert "address" not in trigger["metadata"] and trigger["authenticationRef"] == {"name": "redis-auth"}
    env = {e["name"]: e for e in one(docs, "Deployment", f"{FULLNAME}-worker")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KEYROTOR_REDIS_URL"]["value"] == scenario("sentinel")["redis"]["url"]
    # No database in the URL: 0. From a Secret the URL is unknown: the sentinels and master are given.
    plain = render(chart, {"redis": {"url": "redis+sentinel://s1/mymaster"}, "worker": {"keda": {"enabled": True}}})
    metadata = one(plain, "ScaledObject", f"{FULLNAME}-worker")["spec"]["triggers"][0]["metadata"]
    assert (metadata["addresses"], metadata["sentinelMaster"], metadata["databaseIndex"]) == ("s1:26379", "mymaster", "0")
    given = render(chart, {"redis": {"existingSecret": "redis-url"},
                           "worker": {"keda": {"enabled": True, "address": "s1:26379,s2:26379", "sentinelMaster": "m1",
                                               "databaseIndex": 1}}})
    metadata = one(given, "ScaledObject", f"{FULLNAME}-worker")["spec"]["triggers"][0]["metadata"]
    assert (metadata["addresses"], metadata["sentinelMaster"], metadata["databaseIndex"]) == ("s1:26379,s2:26379", "m1", "1")
    for bad in ({"redis": {"url": "sentinel://s1/m"}}, {"worker": {"keda": {"sentinelMaster": "a b"}}},
                {"worker": {"keda": {"address": "s1:26379,"}}}):
        with pytest.raises(helm.HelmError):
            render(chart, bad)


def test_prometheus_rule_and_dashboard_are_the_repository_files(chart: Any) -> None:
    import json

    docs = render(chart, scenario("ops"))
    rule = one(docs, "PrometheusRule", FULLNAME)
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    assert rule["spec"] == yaml.safe_load((ROOT / "config" / "prometheus" / "keyrotor-rules.yaml").read_text())
    cm = one(docs, "ConfigMap", f"{FULLNAME}-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"]["grafana_folder"] == "keyrotor"
    assert json.loads(cm["data"]["keyrotor-dashboard.json"]) == json.loads(
        (ROOT / "config" / "grafana" / "keyrotor-dashboard.json").read_text())
    defaults = render(chart, {})
    assert not find(defaults, "PrometheusRule") and not find(defaults, "ConfigMap", f"{FULLNAME}-dashboard")


def test_extra_volumes_sidecars_init_containers_and_objects(chart: Any) -> None:
    docs = render(chart, scenario("ops"))
    csc = yaml.safe_load((CHART / "values.yaml").read_text())["containerSecurityContext"]
    for where, _, spec in pod_specs(docs):
        assert {"name": "provider-ca", "configMap": {"name": "corp-ca"}} in spec["volumes"], where
        keyrotor = spec["containers"][0]
        assert {"name": "provider-ca", "mountPath": "/etc/ssl/corp", "readOnly": True} in keyrotor["volumeMounts"], where
    for comp in ("worker", "scheduler"):
        spec = one(docs, "Deployment", f"{FULLNAME}-{comp}")["spec"]["template"]["spec"]
        sidecar = spec["containers"][1]
        assert sidecar["name"] == "sql-proxy" and sidecar["securityContext"] == csc
        assert {"name": "tmp", "mountPath": "/tmp"} in sidecar["volumeMounts"]
        init = spec["initContainers"][0]
        assert init["name"] == "wait-for-proxy" and init["securityContext"] == csc
    for job in find(docs, "Job"):  # one-shot hooks: a sidecar would keep them running
        assert len(job["spec"]["template"]["spec"]["containers"]) == 1
    extra = one(docs, "ConfigMap", f"{RELEASE}-extra")
    assert extra["data"] == {"release": RELEASE}
    assert extra["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
    assert one(docs, "ConfigMap", f"{RELEASE}-extra-text")["metadata"]["namespace"] == NAMESPACE


@pytest.mark.parametrize(("bad", "where"), [
    ({"extraVolumes": [{"name": "host", "hostPath": {"path": "/"}}]}, "/extraVolumes/0"),
    ({"extraContainers": [{"name": "s", "image": "i", "resources": {"requests": {}, "limits": {}},
                           "securityContext": {"privileged": True}}]}, "/extraContainers/0/securityContext"),
    ({"initContainers": [{"name": "s", "image": "i"}]}, "/initContainers/0"),             # no resources
    ({"extraContainers": [{"name": "s", "image": "i", "resources": {"requests": {}, "limits": {}},
                           "ports": [{"containerPort": 80, "hostPort": 80}]}]}, "/extraContainers/0/ports/0/hostPort"),
    ({"worker": {"keda": {"address": "redis://:pw@r:6379"}}}, "/worker/keda/address"),
    ({"probes": {"liveness": {"periodSecond": 3}}}, "/probes/liveness"),
])
def test_schema_keeps_extras_restricted(chart: Any, helm: Any, bad: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmValuesError) as err:
        render(chart, bad)
    assert where in str(err.value), str(err.value)


def test_probes_can_be_overridden_or_dropped(chart: Any) -> None:
    c = one(render(chart, scenario("ops")), "Deployment", f"{FULLNAME}-worker")["spec"]["template"]["spec"]["containers"][0]
    # The given handler replaces GET /healthz; timings not given keep their defaults.
    assert c["livenessProbe"] == {"exec": {"command": ["keyrotor", "--version"]}, "periodSeconds": 30,
                                  "initialDelaySeconds": 0, "timeoutSeconds": 3, "failureThreshold": 3}
    assert "readinessProbe" not in c
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}


def test_default_topology_spread_is_soft_and_per_component(chart: Any) -> None:
    docs = render(chart, {})
    for comp in ("worker", "scheduler"):
        dep = one(docs, "Deployment", f"{FULLNAME}-{comp}")
        (tsc,) = dep["spec"]["template"]["spec"]["topologySpreadConstraints"]
        assert tsc["whenUnsatisfiable"] == "ScheduleAnyway" and tsc["topologyKey"] == "kubernetes.io/hostname"
        assert tsc["labelSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]


def test_helm_test_pod_pings_database_redis_and_vault(chart: Any) -> None:
    docs = render(chart, scenario("full"))
    pod = one(docs, "Pod", f"{FULLNAME}-test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never" and spec["serviceAccountName"] == FULLNAME  # Vault Kubernetes auth
    c = spec["containers"][0]
    assert c["args"][0] == "ping"
    env = env_of(c)
    assert env["KEYROTOR_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "pg-credentials"
    assert env["KEYROTOR_VAULT_K8S_ROLE"]["value"] == "keyrotor-prod"
    assert {m["name"] for m in c["volumeMounts"]} >= {"vault-token", "vault-ca", "tmp"}
    np_ = one(docs, "NetworkPolicy", FULLNAME)
    assert selects(np_["spec"]["podSelector"]["matchLabels"], pod["metadata"]["labels"])  # same egress as workers
    assert not find(render(chart, {"helmTest": {"enabled": False}}), "Pod")


def test_database_pools_are_sized_per_process_and_budgeted(chart: Any, helm: Any) -> None:
    docs = render(chart, {"worker": {"threads": 6}})
    worker = env_of(one(docs, "Deployment", f"{FULLNAME}-worker")["spec"]["template"]["spec"]["containers"][0])
    scheduler = env_of(one(docs, "Deployment", f"{FULLNAME}-scheduler")["spec"]["template"]["spec"]["containers"][0])
    migrate = env_of(one(docs, "Job", f"{FULLNAME}-migrate")["spec"]["template"]["spec"]["containers"][0])
    assert (worker["KEYROTOR_DB_POOL_SIZE"]["value"], worker["KEYROTOR_DB_APPLICATION_NAME"]["value"]) == ("7", "keyrotor-worker")
    assert (scheduler["KEYROTOR_DB_POOL_SIZE"]["value"], scheduler["KEYROTOR_DB_APPLICATION_NAME"]["value"]) == ("4", "keyrotor-scheduler")
    assert migrate["KEYROTOR_DB_APPLICATION_NAME"]["value"] == "keyrotor-migrate"
    assert worker["KEYROTOR_DB_MAX_OVERFLOW"]["value"] == "2" and "KEYROTOR_DB_PREPARED_STATEMENTS" not in worker
    ops = env_of(one(render(chart, scenario("ops")), "Deployment", f"{FULLNAME}-worker")["spec"]["template"]["spec"]["containers"][0])
    assert ops["KEYROTOR_DB_POOL_SIZE"]["value"] == "6" and ops["KEYROTOR_DB_PREPARED_STATEMENTS"]["value"] == "false"
    # Worst case with the HPA at 10 replicas: 10 x 2 processes x (5 + 2) + 2 schedulers x (4 + 2) + 2 = 154.
    too_many = {"worker": {"autoscaling": {"enabled": True, "maxReplicas": 10}}, "database": {"maxConnections": 100}}
    with pytest.raises(helm.HelmError) as err:
        render(chart, too_many)
    assert "up to 154 PostgreSQL connections" in str(err.value)
    too_many["database"]["maxConnections"] = 154
    assert find(render(chart, too_many), "HorizontalPodAutoscaler")


# ------------------------------------------------------------------------------ Kubernetes Secrets
def test_kubernetes_secrets_get_a_role_per_namespace_limited_to_the_declared_names(chart: Any) -> None:
    docs = render(chart, scenario("kubernetes-secrets"))
    roles = {d["metadata"]["namespace"]: d for d in find(docs, "Role")}
    assert set(roles) == {"billing", "reports"}
    assert roles["billing"]["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["billing-api-keys", "billing-extra"],
         "verbs": ["get", "update", "patch"]},
        {"apiGroups": ["apps"], "resources": ["deployments"], "resourceNames": ["billing-api"], "verbs": ["get", "patch"]},
        {"apiGroups": ["apps"], "resources": ["statefulsets"], "resourceNames": ["billing-worker"], "verbs": ["get", "patch"]},
    ]
    assert roles["reports"]["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["reports-keys"],
                                          "verbs": ["get", "update", "patch"]}]
    for rule in (r for role in roles.values() for r in role["rules"]):
        assert rule["resourceNames"] and "*" not in rule["verbs"] and "list" not in rule["verbs"]
    account = one(docs, "ServiceAccount", FULLNAME)
    for binding in find(docs, "RoleBinding"):
        namespace = binding["metadata"]["namespace"]
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": roles[namespace]["metadata"]["name"]}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                        "namespace": NAMESPACE}]
    assert not find(render(chart, {}), "Role") and not find(render(chart, {}), "RoleBinding")


def test_only_the_worker_gets_an_api_server_token_and_only_with_kubernetes_secrets(chart: Any) -> None:
    def mounts(values: dict[str, Any]) -> dict[str, list[str]]:
        found = {}
        for where, _, spec in pod_specs(render(chart, values)):
            names = [m["mountPath"] for c in spec["containers"] for m in c.get("volumeMounts", [])]
            found[where] = [m for m in names if m.startswith("/var/run/secrets/kubernetes.io")]
        return found

    with_secrets = mounts(scenario("kubernetes-secrets"))
    assert [w for w, m in with_secrets.items() if m] == [w for w in with_secrets if "worker" in w and "Deployment" in w]
    assert not any(mounts({}).values())
    docs = render(chart, scenario("kubernetes-secrets"))
    worker = one(docs, "Deployment", f"{FULLNAME}-worker")["spec"]["template"]["spec"]
    assert worker["automountServiceAccountToken"] is False
    projected = next(v for v in worker["volumes"] if v["name"] == "kube-api-token")["projected"]["sources"]
    assert projected[0]["serviceAccountToken"]["expirationSeconds"] == 3600
    assert "audience" not in projected[0]["serviceAccountToken"]       # the API server's own audience
    assert projected[1]["configMap"]["name"] == "kube-root-ca.crt"


def test_network_policy_allows_the_api_server_only_with_kubernetes_secrets(chart: Any) -> None:
    spec = one(render(chart, scenario("kubernetes-secrets")), "NetworkPolicy", FULLNAME)["spec"]
    api = [r for r in spec["egress"] if {"port": 6443, "protocol": "TCP"} in r["ports"]]
    assert api == [{"ports": [{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}],
                    "to": [{"ipBlock": {"cidr": "10.96.0.1/32"}}, {"ipBlock": {"cidr": "172.20.0.0/28"}}]}]
    defaults = one(render(chart, {}), "NetworkPolicy", FULLNAME)["spec"]
    assert not [r for r in defaults["egress"] if {"port": 6443, "protocol": "TCP"} in r["ports"]]


@pytest.mark.parametrize(("bad", "where"), [
    ({"kubernetesSecrets": [{"namespace": "Billing", "secrets": ["a"]}]}, "namespace"),
    ({"kubernetesSecrets": [{"namespace": "billing", "secrets": []}]}, "secrets"),
    ({"kubernetesSecrets": [{"namespace": "billing", "secrets": ["a"], "workloads": [{"kind": "DaemonSet", "name": "x"}]}]}, "kind"),
    ({"kubernetesSecrets": [{"namespace": "billing", "secrets": ["a"], "verbs": ["list"]}]}, "verbs"),
    ({"networkPolicy": {"apiServer": {"cidrs": ["api.example"]}}}, "cidrs"),
])
def test_schema_refuses_bad_kubernetes_secrets_values(chart: Any, helm: Any, bad: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmValuesError) as err:
        render(chart, bad)
    assert where in str(err.value), str(err.value)


def test_a_namespace_listed_twice_fails_with_a_clear_message(chart: Any) -> None:
    values = {"kubernetesSecrets": [{"namespace": "billing", "secrets": ["a"]}, {"namespace": "billing", "secrets": ["b"]}]}
    with pytest.raises(Exception, match="namespace billing is listed twice"):
        render(chart, values)
