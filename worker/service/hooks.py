"""The two pipeline calls the scheduled jobs need, behind one seam so jobs can be tested alone.

The real ones are ``worker.pipeline.requests.request_rotation`` and
``worker.pipeline.outbox.enqueue_run`` (see docs/internals.md, "Rotation requests").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional

from worker.db.models import RotationRun
from worker.pipeline.batch_requests import request_rotations
from worker.pipeline.outbox import EnqueueFn, enqueue_run
from worker.pipeline.requests import request_rotation

RequestFn = Callable[..., "tuple[RotationRun, bool]"]
#: ``request_rotations(session, requests, *, trigger, requested_by)`` (``worker.pipeline.batch_requests``).
BatchRequestFn = Callable[..., Mapping[str, object]]


@dataclass(frozen=True)
class Pipeline:
    request_rotation: RequestFn
    enqueue_run: EnqueueFn
    #: Many requests in one transaction (detection); without it, one ``request_rotation`` each.
    request_rotations: Optional[BatchRequestFn] = None


def default_pipeline() -> Pipeline:
    """The real pipeline."""
    return Pipeline(request_rotation=request_rotation, enqueue_run=enqueue_run, request_rotations=request_rotations)
