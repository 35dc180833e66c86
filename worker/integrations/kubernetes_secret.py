"""Kubernetes Secret integration: the new value goes under one data key of one Secret.

``push`` reads the Secret, changes only that key (and the ``keyrotor.io/written-at`` annotation)
and replaces it with the ``resourceVersion`` it read; a 409 (someone wrote in between) re-reads and
tries again, a bounded number of times, so the other keys are never overwritten with stale values.
Re-delivery of the value already there writes nothing. A ``rolled_back`` announcement writes the
old value the same way. ``verify`` reads the key back and compares fingerprints, then waits for the
restart of the dependent workloads (``kube_restarts``: one restart per workload per batch).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Callable, Optional

from worker.clock import utcnow
from worker.errors import TransientError
from worker.integrations.base import Announcement, VerifyResult, VerifyStatus
from worker.integrations.kube_api import KubeApi, KubeConflict, ObjectRef, decode_value, encode_value
from worker.integrations.kube_restarts import WRITTEN_AT, BatchView, WorkloadRestarts, parse_stamp, stamp
from worker.inventory.schema import KubernetesSecretIntegrationSpec
from worker.log import get_logger
from worker.secret import fingerprint

log = get_logger(__name__)


class KubernetesSecretIntegration:
    def __init__(self, name: str, spec: KubernetesSecretIntegrationSpec, *, api: KubeApi,
                 batch: Optional[BatchView] = None, settle_s: float = 5.0, max_wait_s: float = 600.0,
                 poll_s: float = 5.0, conflict_attempts: int = 5, clock: Callable[[], datetime] = utcnow) -> None:
        self.name = name
        self.spec = spec
        self._api = api
        self._poll_s = poll_s
        self._attempts = max(1, conflict_attempts)
        self._clock = clock
        self.secret_ref = ObjectRef("Secret", spec.namespace, spec.secret)
        self.workloads = [ObjectRef(w.kind, spec.namespace, w.name) for w in spec.workloads]
        self.restarts = WorkloadRestarts(api, batch=batch, settle_s=settle_s, max_wait_s=max_wait_s, clock=clock,
                                         conflict_attempts=conflict_attempts)

    def close(self) -> None:
        self._api.close()

    def push(self, announcement: Announcement) -> None:
        written_at = self._write(announcement)
        if written_at is None:  # the Secret already held the value and keyrotor never wrote it: no pod to restart
            return
        for workload in self.workloads:
            if announcement.event == "rolled_back":
                self.restarts.restart_now(workload, written_at)  # no verify step follows a rollback
            else:
                self.restarts.mark(workload, written_at)

    def verify(self, announcement: Announcement) -> VerifyResult:
        secret = self._api.read_secret(self.secret_ref)
        current = (secret.get("data") or {}).get(self.spec.data_key)
        where = f"{self.secret_ref} key {self.spec.data_key!r}"
        if current is None:
            return VerifyResult(VerifyStatus.mismatch, None, f"{where} is absent")
        value = decode_value(current)
        reported = fingerprint(value) if value is not None else None
        if reported != announcement.fingerprint:
            return VerifyResult(VerifyStatus.mismatch, reported, f"{where} holds another value")
        written_at = parse_stamp(((secret.get("metadata") or {}).get("annotations") or {}).get(WRITTEN_AT))
        if written_at is None:  # written by someone else; a rollout must still pick it up
            written_at = self._stamp_secret(secret)
        waiting: list[str] = []
        for workload in self.workloads:
            state = self.restarts.settle(workload, written_at, self.spec.rollout_timeout.total_seconds())
            if not state.done:
                waiting.append(state.detail)
        if waiting:
            return VerifyResult(VerifyStatus.pending, reported, "; ".join(waiting), retry_in_s=self._poll_s)
        return VerifyResult(VerifyStatus.ok, reported)

    # ----------------------------------------------------------------- the Secret
    def _write(self, announcement: Announcement) -> Optional[datetime]:
        """Put the value under the data key; the Secret's (new or existing) ``written-at``, or None
        when the value was already there without one (nothing written: a rollback before the
        new value ever landed needs no write, nor the permission to make one)."""
        encoded = encode_value(announcement.secret.reveal())
        for _ in range(self._attempts):
            secret = self._api.read_secret(self.secret_ref)
            annotations = (secret.get("metadata") or {}).get("annotations") or {}
            existing = parse_stamp(annotations.get(WRITTEN_AT))
            if (secret.get("data") or {}).get(self.spec.data_key) == encoded:
                log.info("k8s.secret_already_current", integration=self.name, secret=str(self.secret_ref),
                         data_key=self.spec.data_key, fingerprint=announcement.fingerprint)
                return existing
            now = self._clock()
            body = _with_value(secret, self.spec.data_key, encoded, now)
            try:
                written = self._api.replace_secret(self.secret_ref, body)
            except KubeConflict:
                log.info("k8s.secret_conflict", integration=self.name, secret=str(self.secret_ref))
                continue
            log.info("k8s.secret_written", integration=self.name, secret=str(self.secret_ref),
                     data_key=self.spec.data_key, fingerprint=announcement.fingerprint, announcement=announcement.event,
                     resource_version=(written.get("metadata") or {}).get("resourceVersion"))
            return now
        raise TransientError(f"Kubernetes API: {self.secret_ref} changed under every one of {self._attempts} writes "
                             "(409 Conflict each time); will try again")

    def _stamp_secret(self, secret: dict[str, Any]) -> datetime:
        """Stamp a Secret whose value is right but carries no ``written-at`` (now is when we learnt of it)."""
        now = self._clock()
        data = secret.get("data") or {}
        body = _with_value(secret, self.spec.data_key, data[self.spec.data_key], now)
        try:
            self._api.replace_secret(self.secret_ref, body)
        except KubeConflict:
            raise TransientError(f"Kubernetes API: {self.secret_ref} changed while it was being verified") from None
        return now


def _with_value(secret: dict[str, Any], data_key: str, encoded: str, now: datetime) -> dict[str, Any]:
    """The Secret as read, with one data key and the ``written-at`` stamp changed; its
    ``resourceVersion`` stays, so the API server refuses the write if it changed meanwhile."""
    metadata = dict(secret.get("metadata") or {})
    metadata["annotations"] = {**(metadata.get("annotations") or {}), WRITTEN_AT: stamp(now)}
    metadata.pop("managedFields", None)
    return {**secret, "apiVersion": "v1", "kind": "Secret", "metadata": metadata,
            "data": {**(secret.get("data") or {}), data_key: encoded}}
