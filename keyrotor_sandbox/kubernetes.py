"""A Kubernetes API server stand-in for the ``kubernetes_secret`` integration (tests, demo).

It speaks the API server's HTTP protocol for the calls keyrotor makes, so the official
``kubernetes`` client runs against it unchanged:

  GET   /api/v1/namespaces/{ns}/secrets/{name}
  PUT   /api/v1/namespaces/{ns}/secrets/{name}            (``metadata.resourceVersion`` required)
  PATCH /api/v1/namespaces/{ns}/secrets/{name}            (merge / strategic merge patch)
  GET   /apis/apps/v1/namespaces/{ns}/{deployments|statefulsets}/{name}
  PATCH /apis/apps/v1/namespaces/{ns}/{deployments|statefulsets}/{name}

Like the API server: a Bearer token is required (401 Status otherwise); each token has RBAC rules
(namespace, resource, resourceNames, verbs) and anything outside them is 403 Forbidden with the
API server's wording; a missing object is 404 NotFound; a write whose ``resourceVersion`` is not the
current one is 409 Conflict; errors are ``Status`` objects. A change of a workload's pod template
increments ``metadata.generation``; the controller's view (``status.observedGeneration``,
``updatedReplicas``, ``availableReplicas``) catches up ``rollout_delay_s`` later (watch-free: it is
computed when read). Tests drive it through the Python API (``add_secret``, ``grant``,
``concurrent_write_after_next_read``, ``rollouts``).
"""

from __future__ import annotations

import base64
import copy
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Optional

from keyrotor_sandbox.standin_http import Request, Response, ServerHandle, serve_in_thread

MERGE_TYPES = ("application/merge-patch+json", "application/strategic-merge-patch+json")
APPS_RESOURCES = {"deployments": "Deployment", "statefulsets": "StatefulSet"}


@dataclass(frozen=True)
class Rule:
    namespace: str
    resource: str                       # secrets | deployments | statefulsets
    verbs: frozenset[str]
    names: Optional[frozenset[str]] = None  # resourceNames; None = every object of the resource


@dataclass
class Rollout:
    """One pod-template change of a workload, as the tests see it."""

    generation: int
    started: float                      # monotonic
    started_at: datetime                # wall clock (to compare with audit times)
    restarted_at: Optional[str]         # the template's kubectl.kubernetes.io/restartedAt


@dataclass
class _Workload:
    obj: dict[str, Any]
    rollouts: list[Rollout] = field(default_factory=list)


def _status(code: int, reason: str, message: str, *, name: str = "", kind: str = "", group: str = "") -> Response:
    details: dict[str, Any] = {"name": name, "kind": kind}
    if group:
        details["group"] = group
    return Response.json(code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                "message": message, "reason": reason, "details": details, "code": code})


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class KubernetesStandIn:
    def __init__(self, *, rollout_delay_s: float = 0.5, clock: Callable[[], float] = time.monotonic) -> None:
        self.rollout_delay_s = rollout_delay_s
        self._clock = clock
        self._lock = threading.Lock()
        self._version = 1000
        self._secrets: dict[tuple[str, str], dict[str, Any]] = {}
        self._workloads: dict[tuple[str, str, str], _Workload] = {}
        self._tokens: dict[str, tuple[str, list[Rule]]] = {}
        self._after_read: dict[tuple[str, str], list[Callable[[dict[str, Any]], None]]] = {}
        self.requests: list[tuple[str, str, int]] = []   # (method, path, status)
        self._server: Optional[ServerHandle] = None

    # ----------------------------------------------------------------- setup (tests)
    def start(self) -> "KubernetesStandIn":
        self._server = serve_in_thread(self.handle, name="k8s-standin")
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the stand-in first"
        return self._server.url

    def add_token(self, user: str = "system:serviceaccount:keyrotor:keyrotor") -> str:
        token = uuid.uuid4().hex
        with self._lock:
            self._tokens[token] = (user, [])
        return token

    def grant(self, token: str, namespace: str, resource: str, verbs: list[str], names: Optional[list[str]] = None) -> None:
        """One Role rule for the token's user (``names`` = resourceNames)."""
        with self._lock:
            self._tokens[token][1].append(Rule(namespace, resource, frozenset(verbs), frozenset(names) if names else None))

    def revoke_grants(self, token: str) -> None:
        with self._lock:
            self._tokens[token][1].clear()

    def add_secret(self, namespace: str, name: str, values: dict[str, str]) -> None:
        with self._lock:
            self._secrets[(namespace, name)] = {
                "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": self._new_meta(namespace, name),
                "data": {k: base64.b64encode(v.encode()).decode() for k, v in values.items()},
            }

    def add_workload(self, namespace: str, kind: str, name: str, replicas: int = 2) -> None:
        resource = "deployments" if kind == "Deployment" else "statefulsets"
        labels = {"app": name}
        spec: dict[str, Any] = {
            "replicas": replicas, "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels},
                         "spec": {"containers": [{"name": "app", "image": "example/app:1"}]}},
        }
        if kind == "StatefulSet":
            spec["serviceName"] = name
        with self._lock:
            meta = self._new_meta(namespace, name)
            meta["generation"] = 1
            self._workloads[(namespace, resource, name)] = _Workload(
                {"apiVersion": "apps/v1", "kind": kind, "metadata": meta, "spec": spec})

    def secret_values(self, namespace: str, name: str) -> dict[str, str]:
        with self._lock:
            data = self._secrets[(namespace, name)].get("data") or {}
            return {k: base64.b64decode(v).decode() for k, v in data.items()}

    def secret_annotations(self, namespace: str, name: str) -> dict[str, str]:
        with self._lock:
            return dict(self._secrets[(namespace, name)]["metadata"].get("annotations") or {})

    def rollouts(self, namespace: str, kind: str, name: str) -> list[Rollout]:
        resource = "deployments" if kind == "Deployment" else "statefulsets"
        with self._lock:
            return list(self._workloads[(namespace, resource, name)].rollouts)

    def concurrent_write_after_next_read(self, namespace: str, name: str, key: str, value: str) -> None:
        """Another writer changes the Secret right after keyrotor's next GET of it, so keyrotor's
        write carries a stale resourceVersion (409), as when two controllers race."""
        def write(obj: dict[str, Any]) -> None:
            obj.setdefault("data", {})[key] = base64.b64encode(value.encode()).decode()
            obj["metadata"]["resourceVersion"] = self._next_version()

        with self._lock:
            self._after_read.setdefault((namespace, name), []).append(write)

    # ----------------------------------------------------------------- HTTP
    def handle(self, request: Request) -> Response:
        response = self._handle(request)
        with self._lock:
            self.requests.append((request.method, request.path, response.status))
        return response

    def _handle(self, request: Request) -> Response:
        with self._lock:
            identity = self._tokens.get(request.bearer() or "")
        if identity is None:
            return _status(401, "Unauthorized", "Unauthorized")
        parts = request.path.strip("/").split("/")
        if len(parts) == 6 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "secrets":
            namespace, resource, name, group = parts[3], "secrets", parts[5], ""
        elif len(parts) == 7 and parts[:4] == ["apis", "apps", "v1", "namespaces"] and parts[5] in APPS_RESOURCES:
            namespace, resource, name, group = parts[4], parts[5], parts[6], "apps"
        else:
            return _status(404, "NotFound", "the server could not find the requested resource")
        verb = {"GET": "get", "PUT": "update", "PATCH": "patch"}.get(request.method)
        if verb is None:
            return _status(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        user, rules = identity
        if not any(r.namespace == namespace and r.resource == resource and verb in r.verbs
                   and (r.names is None or name in r.names) for r in rules):
            group_text = f'"{group}"' if group else '""'
            return _status(403, "Forbidden",
                           f'{resource} "{name}" is forbidden: User "{user}" cannot {verb} resource "{resource}" '
                           f'in API group {group_text} in the namespace "{namespace}"',
                           name=name, kind=resource, group=group)
        with self._lock:
            if resource == "secrets":
                return self._secret(request, verb, namespace, name)
            return self._workload(request, verb, namespace, resource, name)

    def _secret(self, request: Request, verb: str, namespace: str, name: str) -> Response:
        obj = self._secrets.get((namespace, name))
        if obj is None:
            return _status(404, "NotFound", f'secrets "{name}" not found', name=name, kind="secrets")
        if verb == "get":
            answer = Response.json(200, obj)
            hooks = self._after_read.get((namespace, name))
            if hooks:  # one concurrent write per read
                hooks.pop(0)(obj)
            return answer
        body = self._body(request, verb)
        if isinstance(body, Response):
            return body
        sent_version = (body.get("metadata") or {}).get("resourceVersion")
        if verb == "update" and not sent_version:
            return _status(422, "Invalid", f'Secret "{name}" is invalid: metadata.resourceVersion: Invalid value: 0x0: '
                           "must be specified for an update", name=name, kind="Secret")
        if sent_version and sent_version != obj["metadata"]["resourceVersion"]:
            return self._conflict("secrets", name)
        updated = merge_patch(obj, body) if verb == "patch" else copy.deepcopy(body)
        for value in (updated.get("data") or {}).values():
            try:
                base64.b64decode(value, validate=True)
            except (ValueError, TypeError):
                return _status(422, "Invalid", f'Secret "{name}" is invalid: data: illegal base64 data', name=name, kind="Secret")
        updated["metadata"] = {**obj["metadata"], "annotations": (updated.get("metadata") or {}).get("annotations") or {},
                               "resourceVersion": self._next_version()}
        updated["apiVersion"], updated["kind"] = "v1", "Secret"
        self._secrets[(namespace, name)] = updated
        return Response.json(200, updated)

    def _workload(self, request: Request, verb: str, namespace: str, resource: str, name: str) -> Response:
        workload = self._workloads.get((namespace, resource, name))
        if workload is None:
            return _status(404, "NotFound", f'{resource}.apps "{name}" not found', name=name, kind=resource, group="apps")
        if verb == "update":  # not used by keyrotor, and not granted by its Role
            return _status(405, "MethodNotAllowed", "update of workloads is not modelled by this stand-in")
        if verb == "patch":
            body = self._body(request, verb)
            if isinstance(body, Response):
                return body
            sent_version = (body.get("metadata") or {}).get("resourceVersion")
            if sent_version and sent_version != workload.obj["metadata"]["resourceVersion"]:
                return self._conflict(f"{resource}.apps", name)
            before = copy.deepcopy(workload.obj["spec"]["template"])
            patched = merge_patch(workload.obj, body)
            patched["metadata"] = {**workload.obj["metadata"],
                                   "annotations": (patched.get("metadata") or {}).get("annotations") or {},
                                   "resourceVersion": self._next_version()}
            if patched["spec"]["template"] != before:
                patched["metadata"]["generation"] = int(workload.obj["metadata"]["generation"]) + 1
                annotations = (patched["spec"]["template"].get("metadata") or {}).get("annotations") or {}
                workload.rollouts.append(Rollout(patched["metadata"]["generation"], self._clock(), datetime.now(timezone.utc),
                                                 annotations.get("kubectl.kubernetes.io/restartedAt")))
            workload.obj = patched
        return Response.json(200, self._with_status(workload))

    # ----------------------------------------------------------------- helpers
    def _with_status(self, workload: _Workload) -> dict[str, Any]:
        """The controller's view, computed at read time: a rollout catches up after the delay."""
        obj = copy.deepcopy(workload.obj)
        replicas = int(obj["spec"].get("replicas", 1))
        generation = int(obj["metadata"]["generation"])
        latest = workload.rollouts[-1] if workload.rollouts else None
        if latest is None or self._clock() - latest.started >= self.rollout_delay_s:
            status = {"observedGeneration": generation, "replicas": replicas, "updatedReplicas": replicas,
                      "readyReplicas": replicas, "availableReplicas": replicas}
        else:  # old pods still serve; the new template has not been observed yet
            status = {"observedGeneration": generation - 1, "replicas": replicas, "updatedReplicas": 0,
                      "readyReplicas": replicas, "availableReplicas": replicas}
        obj["status"] = status
        return obj

    def _body(self, request: Request, verb: str) -> Any:
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        if verb == "patch" and content_type not in MERGE_TYPES:
            return _status(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                           f"accepted media types include: {', '.join(MERGE_TYPES)}")
        try:
            body = request.json()
        except ValueError:
            return _status(400, "BadRequest", "the body of the request is not JSON")
        if not isinstance(body, dict):
            return _status(400, "BadRequest", "the body of the request must be an object")
        return body

    def _conflict(self, resource: str, name: str) -> Response:
        return _status(409, "Conflict", f'Operation cannot be fulfilled on {resource} "{name}": the object has been '
                       "modified; please apply your changes to the latest version and try again",
                       name=name, kind=resource.split(".")[0])

    def _next_version(self) -> str:
        self._version += 1
        return str(self._version)

    def _new_meta(self, namespace: str, name: str) -> dict[str, Any]:
        return {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()), "resourceVersion": self._next_version(),
                "creationTimestamp": _now_rfc3339(), "annotations": {}}

