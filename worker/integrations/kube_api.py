"""Kubernetes API access for the ``kubernetes_secret`` integration, on the official client.

Authentication: in-cluster (the pod's service-account token and CA, ``load_incluster_config``)
unless ``KEYROTOR_K8S_API_SERVER`` is set (tests, a worker outside the cluster), then that URL
with ``KEYROTOR_K8S_TOKEN``/``KEYROTOR_K8S_TOKEN_PATH`` and ``KEYROTOR_K8S_CA_CERT``.

Errors become keyrotor's classes (``KubeConflict`` on 409, ``PermanentError`` for 401/403/404 and
other 4xx, ``TransientError`` for 429/5xx and connection trouble) with messages built here: the
client's ``ApiException`` carries the response body (a Secret's body is its values) and headers,
so it is never chained, logged or turned into text.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from worker.errors import ConfigError, PermanentError, TransientError
from worker.retry import parse_retry_after, retry_call

if TYPE_CHECKING:
    from worker.settings import Settings

#: The plural resource name of each workload kind.
WORKLOAD_RESOURCES = {"Deployment": "deployments", "StatefulSet": "statefulsets"}
MERGE_PATCH = "application/merge-patch+json"


class KubeConflict(TransientError):
    """409 Conflict: the object changed since it was read (stale ``resourceVersion``); re-read."""


@dataclass(frozen=True)
class ObjectRef:
    """One namespaced object, for messages: ``Secret apps/billing``."""

    kind: str
    namespace: str
    name: str

    @property
    def resource(self) -> str:
        return "secrets" if self.kind == "Secret" else WORKLOAD_RESOURCES[self.kind]

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


def encode_value(value: str) -> str:
    """A Secret's ``data`` value: base64 of the UTF-8 bytes."""
    return base64.b64encode(value.encode("utf-8")).decode("ascii")


def decode_value(data: str) -> str | None:
    """The text under a ``data`` key, or None when it is not base64 of UTF-8."""
    try:
        return base64.b64decode(data.encode("ascii"), validate=True).decode("utf-8")
    except (ValueError, UnicodeError):
        return None


def api_error(exc: BaseException, verb: str, ref: ObjectRef) -> Exception:
    """A keyrotor error for a failed call (never the response body or headers)."""
    status = getattr(exc, "status", None)
    where = f"Kubernetes API: {verb} {ref}"
    if not isinstance(status, int) or status == 0:
        return TransientError(f"{where} failed ({type(exc).__name__}: no answer from the API server)")
    if status == 409:
        return KubeConflict(f"{where}: 409 Conflict (the object changed since it was read)")
    if status == 401:
        return PermanentError(f"{where}: 401 Unauthorized: the API server rejected the worker's token "
                              "(service-account token, or KEYROTOR_K8S_TOKEN/KEYROTOR_K8S_TOKEN_PATH)")
    if status == 403:
        return PermanentError(
            f"{where}: 403 Forbidden: the worker's service account may not {verb} {ref.resource} "
            f"{ref.name!r} in namespace {ref.namespace!r}; grant '{verb}' on it in the Role "
            "(chart value kubernetesSecrets)")
    if status == 404:
        return PermanentError(f"{where}: 404 Not Found: {ref} does not exist (create it, or fix the integration)")
    headers = getattr(exc, "headers", None) or {}
    retry_after = parse_retry_after(headers.get("Retry-After") if hasattr(headers, "get") else None)
    if status == 429 or status >= 500:
        return TransientError(f"{where}: answered {status}", retry_after=retry_after)
    return PermanentError(f"{where}: answered {status} {getattr(exc, 'reason', '') or ''}".rstrip())


class KubeApi:
    """The few calls the integration makes; objects come back as plain JSON-shaped dicts."""

    def __init__(self, api_client: Any, *, timeout_s: float = 10.0, attempts: int = 3,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        from kubernetes import client

        self._api_client = api_client
        self._core = client.CoreV1Api(api_client)
        self._apps = client.AppsV1Api(api_client)
        self._timeout = timeout_s
        self._attempts = max(1, attempts)
        self._sleep = sleep

    @classmethod
    def from_settings(cls, settings: "Settings") -> "KubeApi":
        return cls(api_client_from_settings(settings), timeout_s=settings.k8s_timeout_s)

    def close(self) -> None:
        self._api_client.close()

    # ----------------------------------------------------------------- Secrets
    def read_secret(self, ref: ObjectRef) -> dict[str, Any]:
        return self._call("get", ref, lambda: self._core.read_namespaced_secret(
            ref.name, ref.namespace, _request_timeout=self._timeout))

    def replace_secret(self, ref: ObjectRef, body: dict[str, Any]) -> dict[str, Any]:
        """PUT with the ``resourceVersion`` the body carries: 409 (``KubeConflict``) when stale."""
        return self._call("update", ref, lambda: self._core.replace_namespaced_secret(
            # the client serialises a plain dict body as is; its stubs only name the model class
            ref.name, ref.namespace, body, _request_timeout=self._timeout), retry=False)  # type: ignore[arg-type]

    # ----------------------------------------------------------------- workloads
    def read_workload(self, ref: ObjectRef) -> dict[str, Any]:
        read = self._apps.read_namespaced_deployment if ref.kind == "Deployment" else self._apps.read_namespaced_stateful_set
        return self._call("get", ref, lambda: read(ref.name, ref.namespace, _request_timeout=self._timeout))

    def patch_workload(self, ref: ObjectRef, patch: dict[str, Any]) -> dict[str, Any]:
        """JSON merge patch; a ``metadata.resourceVersion`` in it is a precondition (409 when stale)."""
        call = self._apps.patch_namespaced_deployment if ref.kind == "Deployment" else self._apps.patch_namespaced_stateful_set
        return self._call("patch", ref, lambda: call(ref.name, ref.namespace, patch, _content_type=MERGE_PATCH,
                                                     _request_timeout=self._timeout), retry=False)

    # ----------------------------------------------------------------- plumbing
    def _call(self, verb: str, ref: ObjectRef, fn: Callable[[], Any], *, retry: bool = True) -> dict[str, Any]:
        def once() -> dict[str, Any]:
            try:
                result = fn()
            except Exception as exc:  # ApiException (body!), urllib3 errors: replaced, never chained
                error = api_error(exc, verb, ref)
            else:
                return self._api_client.sanitize_for_serialization(result)
            raise error

        # Writes are not retried here: the caller re-reads (a write that timed out may have landed).
        attempts = self._attempts if retry else 1
        return retry_call(once, attempts=attempts, base_delay=0.2, max_delay=3.0, sleep=self._sleep,
                          retry_on=(TransientError,))


def api_client_from_settings(settings: "Settings") -> Any:
    """An ``ApiClient``: the override from settings, else the pod's in-cluster configuration."""
    from kubernetes import client, config

    configuration = client.Configuration()
    if settings.k8s_api_server:
        configuration.host = settings.k8s_api_server
        token = settings.k8s_token
        if token is None and settings.k8s_token_path is not None:
            try:
                token = settings.k8s_token_path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"KEYROTOR_K8S_TOKEN_PATH: cannot read {settings.k8s_token_path} ({exc.strerror})") from None
        configuration.api_key = {"BearerToken": token or ""}
        configuration.api_key_prefix = {"BearerToken": "Bearer"}
        if settings.k8s_ca_cert is not None:
            configuration.ssl_ca_cert = str(settings.k8s_ca_cert)
    else:
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException as exc:
            raise ConfigError(f"Kubernetes API: not running in a cluster ({exc}); set KEYROTOR_K8S_API_SERVER "
                              "and KEYROTOR_K8S_TOKEN to reach one from outside") from None
    configuration.retries = False  # one retry layer: ours (retry_call), not urllib3's as well
    return client.ApiClient(configuration)
