"""Prometheus metrics: one registry per app, fed by engine hooks, HTTP middleware and scrape-time sampling.

Adapter label values stay bounded: at most `max_adapters` adapters keep their own `adapter` label
(the busiest ones, re-ranked at scrape time); every other adapter is counted under `other`, the base
model under `base`. Demoting an adapter removes its series and new traffic goes to `other`, so every
series stays monotonic.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from server.engine.async_engine import AsyncEngine, EngineObserver, RequestStats

BASE = "base"
OTHER = "other"
NO_ADAPTER = "none"  # requests that name no model: other routes, or refused before the body was read
# A busier unlabelled adapter replaces the quietest labelled one only past this factor (no flapping).
PROMOTE_FACTOR = 2.0

disable_created_metrics()  # the *_created series double the output and nobody graphs them

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_LOAD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class AdapterLabels:
    """Maps adapter names to bounded label values; thread-safe (engine worker + event loop)."""

    def __init__(self, max_labels: int, on_demote: Callable[[str], None]) -> None:
        self.max_labels = max_labels
        self._on_demote = on_demote
        self._lock = threading.Lock()
        self._traffic: dict[str, int] = {}
        self._labelled: set[str] = set()

    def label(self, adapter: str | None, *, count: bool = False) -> str:
        """The label for `adapter` (None = the base model); `count` adds one request of traffic."""
        if adapter is None:
            return BASE
        with self._lock:
            if count:
                self._traffic[adapter] = self._traffic.get(adapter, 0) + 1
            if adapter in self._labelled:
                return adapter
            if len(self._labelled) < self.max_labels:
                self._labelled.add(adapter)
                return adapter
            return OTHER

    def rebalance(self) -> None:
        """Promote unlabelled adapters that clearly out-traffic the quietest labelled ones."""
        demoted = []
        with self._lock:
            outside = sorted((n for n in self._traffic if n not in self._labelled),
                             key=lambda n: self._traffic[n], reverse=True)
            for name in outside:
                if len(self._labelled) < self.max_labels:
                    self._labelled.add(name)
                    continue
                quiet = min(self._labelled, key=lambda n: self._traffic.get(n, 0))
                if self._traffic[name] <= PROMOTE_FACTOR * self._traffic.get(quiet, 0):
                    break
                self._labelled.discard(quiet)
                self._labelled.add(name)
                demoted.append(quiet)
        for name in demoted:
            self._on_demote(name)

    @property
    def labelled(self) -> set[str]:
        with self._lock:
            return set(self._labelled)


class Metrics(EngineObserver):
    """All of peftserve's metrics, in a registry of their own."""

    def __init__(self, engine: AsyncEngine, *, max_adapters: int = 20) -> None:
        self.engine = engine
        self.registry = CollectorRegistry(auto_describe=True)
        self.labels = AdapterLabels(max_adapters, self._remove_adapter_series)
        # Per storage tier ("device" here; the app adds "cpu" and "disk"): adapters held, loads, evictions.
        self.residency: dict[str, Callable[[], int]] = {"device": lambda: engine.stats().slots_resident}
        self.tier_loads: dict[str, Callable[[], int]] = {"device": lambda: engine.stats().slot_loads}
        self.tier_evictions: dict[str, Callable[[], int]] = {"device": lambda: engine.stats().slot_evictions}
        r = self.registry
        self.requests = Counter("peftserve_http_requests", "HTTP requests by route, status and adapter",
                                ["route", "status", "adapter"], registry=r)
        self.prompt_tokens = Counter("peftserve_prompt_tokens", "Prompt tokens processed", ["adapter"], registry=r)
        self.generation_tokens = Counter("peftserve_generation_tokens", "Tokens generated", ["adapter"], registry=r)
        self.cache_queried = Counter("peftserve_prefix_cache_queried_tokens",
                                     "Prompt tokens (virtual included) looked up in the prefix cache at admission",
                                     ["adapter"], registry=r)
        self.cache_hit = Counter("peftserve_prefix_cache_hit_tokens",
                                 "Prompt tokens found in the prefix cache (not prefilled)", ["adapter"], registry=r)
        self.finished = Counter("peftserve_sequences_finished", "Sequences that left the engine, by reason",
                                ["finish_reason"], registry=r)
        self.preemptions = Counter("peftserve_preemptions", "Sequence preemptions (KV cache full)", registry=r)
        self.ttft = Histogram("peftserve_time_to_first_token_seconds", "Arrival to first generated token",
                              ["adapter"], buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("peftserve_inter_token_latency_seconds", "Time between consecutive tokens",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("peftserve_e2e_request_latency_seconds", "Arrival to the sequence's end",
                             ["adapter"], buckets=_LATENCY_BUCKETS, registry=r)
        self.load_latency = Histogram("peftserve_adapter_load_seconds", "Copying an adapter into a device slot",
                                      buckets=_LOAD_BUCKETS, registry=r)
        self.step_latency = Histogram("peftserve_engine_step_seconds", "One engine step (forward + sample)",
                                      buckets=_ITL_BUCKETS, registry=r)
        self._seen_routes: dict[str, set[tuple[str, str]]] = {}
        # Held while a label is chosen and its series updated, and while labels are re-ranked, so a
        # demoted adapter's series is never re-created by an update racing the demotion.
        self.lock = threading.RLock()
        r.register(_EngineCollector(self))

    # ---- HTTP side --------------------------------------------------------------------------------
    def adapter_label(self, adapter: str | None, *, count: bool = False) -> str:
        """The bounded label for an adapter name (None: base); `count` records one request of traffic."""
        return self.labels.label(adapter, count=count)

    def observe_request(self, route: str, status: int, adapter_label: str) -> None:
        """Count one finished HTTP request; `adapter_label` comes from adapter_label()."""
        with self.lock:
            self._seen_routes.setdefault(adapter_label, set()).add((route, str(status)))
            self.requests.labels(route, str(status), adapter_label).inc()

    def render(self) -> bytes:
        """The registry in Prometheus text format (re-ranks adapter labels first)."""
        with self.lock:
            self.labels.rebalance()
        return generate_latest(self.registry)

    def _remove_adapter_series(self, label: str) -> None:
        seen = self._seen_routes.pop(label, set())
        for route, status in seen:
            _remove(self.requests, route, status, label)
        for metric in (self.prompt_tokens, self.generation_tokens, self.cache_queried, self.cache_hit, self.ttft,
                       self.e2e):
            _remove(metric, label)

    # ---- engine hooks (worker thread) ---------------------------------------------------------------
    def on_step(self, engine: AsyncEngine, num_tokens: int, num_seqs: int, seconds: float) -> None:
        self.step_latency.observe(seconds)

    def on_token(self, adapter: str | None, first: bool, seconds_since_last: float) -> None:
        if first:
            with self.lock:
                self.ttft.labels(self.labels.label(adapter)).observe(seconds_since_last)
        else:
            self.itl.observe(seconds_since_last)

    def on_adapter_load(self, adapter: str, slot: int, seconds: float) -> None:
        self.load_latency.observe(seconds)

    def on_request_done(self, stats: RequestStats) -> None:
        with self.lock:
            label = self.labels.label(stats.adapter)
            # Prompt tokens as the client sent them, once, even when a preemption recomputed them.
            self.prompt_tokens.labels(label).inc(stats.prompt_tokens)
            self.generation_tokens.labels(label).inc(stats.completion_tokens)
            if stats.cache_queried_tokens:
                self.cache_queried.labels(label).inc(stats.cache_queried_tokens)
                self.cache_hit.labels(label).inc(stats.cache_hit_tokens)
            self.e2e.labels(label).observe(stats.finished_at - stats.arrival)
        self.finished.labels(stats.finish_reason).inc()
        if stats.num_preemptions:
            self.preemptions.inc(stats.num_preemptions)


def _remove(metric: Any, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass


def _by_tier(family: Any, sources: dict[str, Callable[[], int]]) -> Any:
    for tier, fn in sources.items():
        family.add_metric([tier], fn())
    return family


class _EngineCollector:
    """Gauges and engine-owned counters, read from the engine at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def describe(self) -> list[Metric]:
        return []  # sampled lazily; nothing to check for name clashes up front

    def collect(self) -> Iterator[Metric]:
        eng = self.m.engine
        st = eng.stats()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        yield gauge("peftserve_num_requests_waiting", "Sequences accepted and not yet running", eng.num_waiting)
        yield gauge("peftserve_num_requests_running", "Sequences in the running batch", eng.num_running)
        yield gauge("peftserve_kv_blocks_used", "KV cache blocks in use", st.kv_blocks_used)
        yield gauge("peftserve_kv_blocks_total", "KV cache blocks in all", st.kv_blocks_total)
        yield gauge("peftserve_kv_blocks_cached", "KV blocks holding reusable prefix-cache KV (in use or idle)",
                    st.kv_blocks_cached)
        yield gauge("peftserve_kv_blocks_cached_idle", "Cached KV blocks no sequence uses (evictable, LRU)",
                    st.kv_blocks_cached_idle)
        yield CounterMetricFamily("peftserve_prefix_cache_evictions", "Cached KV blocks evicted to make room",
                                  value=st.prefix_cache_evictions)
        yield gauge("peftserve_adapter_slots_in_use", "Device adapter slots used by running sequences",
                    st.slots_in_use)
        yield gauge("peftserve_adapter_slots_total", "Device adapter slots", st.slots_total)
        yield gauge("peftserve_adapter_pages_used", "Pages of the adapter pool held by resident adapters",
                    st.adapter_pages_used)
        yield gauge("peftserve_adapter_pages_total", "Pages of the adapter pool (--adapter-memory)",
                    st.adapter_pages_total)
        yield gauge("peftserve_engine_alive", "1 while the engine loop is stepping", 1 if eng.alive else 0)
        m = self.m
        yield _by_tier(GaugeMetricFamily("peftserve_adapters_resident", "Adapters held per tier", labels=["tier"]),
                       m.residency)
        yield _by_tier(CounterMetricFamily("peftserve_adapter_loads", "Adapter loads into a tier", labels=["tier"]),
                       m.tier_loads)
        yield _by_tier(CounterMetricFamily("peftserve_adapter_evictions", "Adapters evicted from a tier",
                                           labels=["tier"]), m.tier_evictions)
        yield CounterMetricFamily("peftserve_engine_steps", "Engine steps run", value=eng.steps)
