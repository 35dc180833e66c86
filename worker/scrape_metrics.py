"""Metrics read from their source (Redis, the database) when Prometheus scrapes.

``ScrapeTimeCollector`` runs each source's ``read()``; a source that fails (down, slow past its
timeout) contributes no series for this scrape and ``keyrotor_collector_up{collector=<name>}`` 0,
so one unreachable dependency never fails the whole scrape. Sources: worker/queue_metrics.py
(Redis queue depth) and worker/key_metrics.py (per-key expiry and due time).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Protocol

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from worker.log import get_logger

log = get_logger(__name__)


class ScrapeSource(Protocol):
    name: str

    def families(self) -> list[GaugeMetricFamily]:
        """Empty families naming what ``read`` returns (for registration and the dashboard test)."""

    def read(self) -> list[GaugeMetricFamily]:
        """The families with their current values; raises when the source cannot be read."""


class ScrapeTimeCollector(Collector):
    def __init__(self, sources: Iterable[ScrapeSource]) -> None:
        self._sources = list(sources)

    @staticmethod
    def _up() -> GaugeMetricFamily:
        return GaugeMetricFamily("keyrotor_collector_up",
                                 "1 when the scrape-time collector could read its source (queues: Redis, keys: the database), else 0.",
                                 labels=["collector"])

    def describe(self) -> list[Any]:
        return [self._up(), *(f for source in self._sources for f in source.families())]

    def collect(self) -> Iterator[Any]:
        up, read = self._up(), []
        for source in self._sources:
            try:
                read.extend(source.read())
            except Exception as exc:  # report the dependency as down; keep the rest of the scrape
                log.warning("scrape_source_unavailable", collector=source.name, error=type(exc).__name__,
                            detail=str(exc)[:200])
                up.add_metric([source.name], 0)
            else:
                up.add_metric([source.name], 1)
        yield up
        yield from read
