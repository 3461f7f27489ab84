"""Prometheus counters of per-request compositions, read from the Composer at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, Metric


class CompositionCollector:
    def __init__(self, composer: Any) -> None:
        self.composer = composer

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily("peftserve_compositions_computed",
                                  "Adapter compositions (adapters/merge/lora_scale) computed",
                                  value=self.composer.computed)
        yield CounterMetricFamily("peftserve_composition_cache_hits",
                                  "Requests served by a composition already computed (cached in the CPU tier)",
                                  value=self.composer.hits)
