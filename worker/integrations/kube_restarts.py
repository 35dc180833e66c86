"""Restarts of the workloads that read a Kubernetes Secret: once per batch, like
``kubectl rollout restart`` (a new ``kubectl.kubernetes.io/restartedAt`` in the pod template).

The state lives on the Kubernetes objects, so every worker process sees the same thing:

- every Secret write stamps the Secret with ``keyrotor.io/written-at`` (when its content last changed);
- the push then marks each dependent workload ``keyrotor.io/restart-wanted-after`` (the latest write
  it must pick up; metadata only, which starts no rollout);
- verification of a run calls :meth:`WorkloadRestarts.settle` per workload: a rollout whose
  ``restartedAt`` is at or after the Secret's ``written-at`` covers this run's write, and the run
  waits for it to finish. Otherwise the workload is restarted only once the batch is complete —
  no open run that will write a Secret this workload reads is still before its push
  (:class:`BatchView`, from the database), and ``settle_s`` has passed since the last mark — or the
  oldest waiting write is ``max_wait_s`` old (a stalled run does not hold the others for ever).
  The restart patch carries the ``resourceVersion`` it read: of two workers deciding at once, one
  gets 409, re-reads, finds the rollout already covers its write and starts none of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Optional, Protocol

from worker.clock import utcnow
from worker.errors import PermanentError, TransientError
from worker.integrations.kube_api import KubeApi, KubeConflict, ObjectRef
from worker.log import get_logger

log = get_logger(__name__)

RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"
WRITTEN_AT = "keyrotor.io/written-at"
RESTART_WANTED = "keyrotor.io/restart-wanted-after"


class BatchView(Protocol):
    def unpushed_runs(self, workload: ObjectRef) -> list[str]:
        """Ids of open runs (not waiting for a person) that will write a Secret ``workload`` reads
        and have not written it yet."""
        ...


@dataclass(frozen=True)
class RolloutState:
    done: bool
    detail: str


def stamp(moment: datetime) -> str:
    """RFC 3339 in UTC with microseconds (kubectl writes whole seconds; both parse)."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_stamp(value: Any) -> Optional[datetime]:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _annotations(obj: dict[str, Any], *path: str) -> dict[str, Any]:
    node: Any = obj
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    found = node.get("annotations") if isinstance(node, dict) else None
    return found if isinstance(found, dict) else {}


def rollout_progress(obj: dict[str, Any]) -> tuple[bool, str]:
    """Whether the workload's latest template is rolled out (as ``kubectl rollout status`` judges):
    the controller saw the newest generation and every wanted replica is updated and available."""
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    wanted = int(spec.get("replicas", 1) if spec.get("replicas") is not None else 1)
    generation = int((obj.get("metadata") or {}).get("generation") or 0)
    observed = int(status.get("observedGeneration") or 0)
    updated, available = int(status.get("updatedReplicas") or 0), int(status.get("availableReplicas") or 0)
    done = observed >= generation and updated == wanted and available == wanted
    return done, f"generation {observed}/{generation} observed, {updated}/{wanted} updated, {available}/{wanted} available"


class WorkloadRestarts:
    def __init__(self, api: KubeApi, *, batch: Optional[BatchView], settle_s: float, max_wait_s: float,
                 clock: Callable[[], datetime] = utcnow, conflict_attempts: int = 5) -> None:
        self._api = api
        self._batch = batch
        self._settle_s = settle_s
        self._max_wait_s = max_wait_s
        self._clock = clock
        self._attempts = max(1, conflict_attempts)

    def mark(self, workload: ObjectRef, written_at: datetime) -> None:
        """Record on the workload that it must pick up a write made at ``written_at``."""
        for _ in range(self._attempts):
            obj = self._api.read_workload(workload)
            wanted = parse_stamp(_annotations(obj, "metadata").get(RESTART_WANTED))
            if wanted is not None and wanted >= written_at:
                return
            patch = {"metadata": {"resourceVersion": obj["metadata"]["resourceVersion"],
                                  "annotations": {RESTART_WANTED: stamp(written_at)}}}
            try:
                self._api.patch_workload(workload, patch)
            except KubeConflict:
                continue
            log.info("k8s.restart_wanted", workload=str(workload), after=stamp(written_at))
            return
        raise TransientError(f"Kubernetes API: {workload} kept changing; could not mark it for a restart")

    def restart_now(self, workload: ObjectRef, written_at: datetime) -> bool:
        """Restart unless a rollout at or after ``written_at`` exists (rollback: no batching)."""
        for _ in range(self._attempts):
            obj = self._api.read_workload(workload)
            restarted = parse_stamp(_annotations(obj, "spec", "template", "metadata").get(RESTARTED_AT))
            if restarted is not None and restarted >= written_at:
                return False
            try:
                self._restart(workload, obj, reason="rollback")
            except KubeConflict:
                continue
            return True
        raise TransientError(f"Kubernetes API: {workload} kept changing; could not restart it")

    def settle(self, workload: ObjectRef, written_at: datetime, rollout_timeout_s: float) -> RolloutState:
        """Verification's view of one workload for a write made at ``written_at``: done once a
        rollout started at or after it has finished; restarts it when the batch is complete."""
        for _ in range(self._attempts):
            obj = self._api.read_workload(workload)
            now = self._clock()
            restarted = parse_stamp(_annotations(obj, "spec", "template", "metadata").get(RESTARTED_AT))
            if restarted is not None and restarted >= written_at:
                done, progress = rollout_progress(obj)
                if done:
                    return RolloutState(True, f"{workload} rolled out after its restart at {stamp(restarted)}")
                if (now - restarted).total_seconds() > rollout_timeout_s:
                    raise PermanentError(f"rollout of {workload} did not finish within {rollout_timeout_s:.0f}s of its "
                                         f"restart at {stamp(restarted)} ({progress}); its pods may not work with the new key")
                return RolloutState(False, f"{workload} rolling out: {progress}")
            wanted = parse_stamp(_annotations(obj, "metadata").get(RESTART_WANTED)) or written_at
            quiet_s = (now - max(wanted, written_at)).total_seconds()
            if quiet_s < self._settle_s:
                return RolloutState(False, f"{workload}: restart in {self._settle_s - quiet_s:.1f}s unless more Secrets change")
            waited_s = (now - written_at).total_seconds()
            others = self._batch.unpushed_runs(workload) if self._batch is not None else []
            if others and waited_s < self._max_wait_s:
                return RolloutState(False, f"{workload}: waiting for {len(others)} other run(s) of the batch to write "
                                           f"their Secrets before one restart ({', '.join(sorted(others)[:5])})")
            try:
                self._restart(workload, obj, reason="batch complete" if not others else "batch wait exceeded",
                              waiting_for=len(others))
            except KubeConflict:
                continue  # someone changed it (perhaps restarted it): look again
            return RolloutState(False, f"{workload} restarted")
        raise TransientError(f"Kubernetes API: {workload} kept changing; will look again")

    def _restart(self, workload: ObjectRef, obj: dict[str, Any], *, reason: str, waiting_for: int = 0) -> None:
        at = stamp(self._clock())
        patch = {"metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]},
                 "spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: at}}}}}
        self._api.patch_workload(workload, patch)
        log.info("k8s.workload_restarted", workload=str(workload), restarted_at=at, reason=reason,
                 runs_not_pushed=waiting_for)
