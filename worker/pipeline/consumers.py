"""Who consumes the queue: Dramatiq's Redis broker keeps a heartbeat per broker process in the
sorted set ``<namespace>:__heartbeats__`` (member: broker id, score: milliseconds since the
epoch), refreshed by every broker command — at least every second while a worker runs.

A producer's own commands add its id too, so callers exclude their own broker id.
"""

from __future__ import annotations

import time
from typing import Any, Iterable


def heartbeats_key(namespace: str) -> str:
    return f"{namespace}:__heartbeats__"


def live_consumers(client: Any, namespace: str, *, within_s: float, exclude: Iterable[str] = (),
                   now_ms: int | None = None) -> list[str]:
    """Broker ids with a heartbeat in the last ``within_s`` seconds, ``exclude`` left out."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    members = client.zrangebyscore(heartbeats_key(namespace), now_ms - int(within_s * 1000), "+inf")
    skip = set(exclude)
    names = [m.decode() if isinstance(m, bytes) else str(m) for m in members]
    return [name for name in names if name not in skip]
