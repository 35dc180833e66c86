"""Per-key expiry, due time and last rotation, read from the database when Prometheus scrapes
(registered by ``keyrotor scheduler``; see worker/queue_metrics.py for why at scrape time).

Cardinality is bounded: at most ``KEYROTOR_METRICS_MAX_KEY_SERIES`` keys get per-key series,
those due soonest first (due time already accounts for expiry, so the keys an alert would be about
are the ones kept); ``keyrotor_key_series_omitted`` says how many were left out. Labels are the
key's inventory name and its provider: never a provider key id, a fingerprint or a secret.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Callable

from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select, text
from sqlalchemy.engine import Engine
from sqlmodel import col

from worker.clock import utcnow
from worker.db.models import ManagedKey, RotationRun
from worker.db.session import session_scope


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)  # SQLite drops the zone


class KeyCollector:
    """``keyrotor_key_{expires,due}_in_seconds``, ``keyrotor_key_last_rotation_timestamp_seconds``,
    ``keyrotor_key_rotation_open``, ``keyrotor_managed_keys`` and ``keyrotor_key_series_omitted``
    (a ``ScrapeSource`` of worker/scrape_metrics.py)."""

    name = "keys"

    def __init__(self, engine: Engine, *, max_series: int, timeout_s: float = 2.0,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self._engine = engine
        self._max = max_series
        self._timeout_ms = max(1, int(timeout_s * 1000))
        self._clock = clock

    @staticmethod
    def families() -> list[GaugeMetricFamily]:
        labels = ["key", "provider"]
        return [
            GaugeMetricFamily("keyrotor_key_expires_in_seconds",
                              "Seconds until the key's current credential expires at the provider (negative: expired).", labels=labels),
            GaugeMetricFamily("keyrotor_key_due_in_seconds",
                              "Seconds until the key is due for rotation (negative: past due).", labels=labels),
            GaugeMetricFamily("keyrotor_key_last_rotation_timestamp_seconds",
                              "Unix time of the key's last successful rotation.", labels=labels),
            GaugeMetricFamily("keyrotor_key_rotation_open", "1 while the key has an open rotation run, else 0.", labels=labels),
            GaugeMetricFamily("keyrotor_managed_keys", "Enabled keys keyrotor rotates, by provider.", labels=["provider"]),
            GaugeMetricFamily("keyrotor_key_series_omitted",
                              "Enabled keys without per-key series (beyond KEYROTOR_METRICS_MAX_KEY_SERIES)."),
        ]

    def read(self) -> list[GaugeMetricFamily]:
        now = self._clock()
        expires, due, last, open_run, managed, omitted = self.families()
        with session_scope(self._engine) as session:
            if session.get_bind().dialect.name == "postgresql":
                session.execute(text(f"SET LOCAL statement_timeout = {self._timeout_ms}"))
            totals = session.execute(select(col(ManagedKey.provider), func.count()).where(col(ManagedKey.enabled).is_(True))
                                     .group_by(col(ManagedKey.provider))).all()
            rows = [] if self._max <= 0 else session.execute(
                select(col(ManagedKey.name), col(ManagedKey.provider), col(ManagedKey.expires_at),
                       col(ManagedKey.next_due_at), col(ManagedKey.last_rotated_at), col(RotationRun.id))
                .outerjoin(RotationRun, (col(RotationRun.key_id) == col(ManagedKey.id)) & col(RotationRun.finished_at).is_(None))
                .where(col(ManagedKey.enabled).is_(True))
                .order_by(col(ManagedKey.next_due_at).asc().nulls_last(), col(ManagedKey.name))
                .limit(self._max)).all()
        total = 0
        for provider, count in totals:
            managed.add_metric([provider], count)
            total += count
        for name, provider, expires_at, next_due_at, last_rotated_at, open_run_id in rows:
            key = [name, provider]
            if (exp := _aware(expires_at)) is not None:
                expires.add_metric(key, (exp - now).total_seconds())
            if (nd := _aware(next_due_at)) is not None:
                due.add_metric(key, (nd - now).total_seconds())
            if (lr := _aware(last_rotated_at)) is not None:
                last.add_metric(key, lr.timestamp())
            open_run.add_metric(key, 1 if open_run_id is not None else 0)
        omitted.add_metric([], max(0, total - len(rows)))
        return [expires, due, last, open_run, managed, omitted]
