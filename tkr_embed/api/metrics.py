"""Prometheus metrics (/metrics).

Two kinds: request metrics, updated as each request ends (RequestContextMiddleware -> RequestStats
-> here), and engine metrics, read from the service's own counters when Prometheus scrapes (a
collector: nothing on the hot path). One registry per app, so several apps in one process (tests)
never share series.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from fastapi import FastAPI

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self, app: "FastAPI", multiprocess: bool = False):
        """multiprocess: one of several front-end processes (server.frontends > 1). Request metrics
        then go through prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by the
        engine process) and /metrics reports every front end's sum, whichever one the scrape
        reaches; engine figures (queue, worker, batch sizes) come from the engine's snapshot."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("tkr_requests", "HTTP requests by route template and status.",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("tkr_request_duration_seconds", "Request latency, first byte in to last byte out.",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.rate_limited = Counter("tkr_rate_limit_rejections", "Requests refused by a rate limit (429).",
                                    registry=self.registry)
        self.batch_size = None if multiprocess else Histogram(
            "tkr_batch_size", "Items per forward pass.", buckets=BATCH_BUCKETS, registry=self.registry)
        # (route template or "(unmatched)", status) -> their series: as bounded as the labels
        self._series: dict[tuple[str, int], tuple] = {}
        self.exposition = self.registry  # what /metrics renders
        if multiprocess:  # every front end's request metrics, from the shared files
            from prometheus_client import multiprocess as mp

            self.exposition = CollectorRegistry()
            mp.MultiProcessCollector(self.exposition)
        self.exposition.register(_EngineCollector(app))

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        series = self._series.get((route, status))
        if series is None:  # labels() validates and locks on every call: look each pair up once
            series = self._series[(route, status)] = (self.requests.labels(route, str(status)),
                                                      self.latency.labels(route))
        series[0].inc()
        series[1].observe(seconds)

    def observe_batch(self, size: int) -> None:
        if self.batch_size is not None:
            self.batch_size.observe(size)


class _EngineCollector(Collector):
    """The service's counters, read at scrape time."""

    def __init__(self, app: "FastAPI"):
        self.app = app

    def collect(self):
        service = getattr(self.app.state, "engine", None)  # set even while loading
        draining = bool(getattr(self.app.state, "draining", False))
        ready = GaugeMetricFamily("tkr_ready", "1 when the model is loaded, warmed up and not draining.")
        ready.add_metric([], 1.0 if service is not None and service.ready and not draining else 0.0)
        yield ready
        if service is None:
            return
        pool = getattr(self.app.state, "pool", None)
        services = [e.service for e in pool.entries if e.loaded] if pool is not None else []
        services = services or ([service] if service.ready else [])
        items = CounterMetricFamily("tkr_items_embedded", "Items embedded (cache hits included), by model and modality.",
                                    labels=["model", "modality"])
        tokens = CounterMetricFamily("tkr_tokens", "Tokens of embedded items (image tokens included).", labels=["model"])
        hits = CounterMetricFamily("tkr_cache_hits", "Embedding cache hits.", labels=["model"])
        misses = CounterMetricFamily("tkr_cache_misses", "Embedding cache misses.", labels=["model"])
        entries = GaugeMetricFamily("tkr_cache_entries", "Vectors held by the cache.", labels=["model"])
        memory = GaugeMetricFamily("tkr_model_memory_bytes", "MLX memory a loaded model's weights took.",
                                   labels=["model"])
        for s in services:
            m, c = s.model_id, s.counters()
            for modality, n in sorted(c.get("items_by_modality", {}).items()):
                items.add_metric([m, modality], n)
            tokens.add_metric([m], c.get("tokens_total", 0))
            hits.add_metric([m], c.get("cache_hits", 0))
            misses.add_metric([m], c.get("cache_misses", 0))
            entries.add_metric([m], c.get("cache_size", 0))
            memory.add_metric([m], s.memory_bytes)
        yield from (items, tokens, hits, misses, entries, memory)
        worker = service.worker
        yield CounterMetricFamily("tkr_worker_busy_seconds", "Time the MLX worker spent running jobs.",
                                  value=worker.busy_seconds)
        for key, name in (("active_bytes", "tkr_mlx_memory_active_bytes"), ("peak_bytes", "tkr_mlx_memory_peak_bytes"),
                          ("cache_bytes", "tkr_mlx_memory_cache_bytes")):
            if key in worker.memory:
                yield GaugeMetricFamily(name, f"MLX memory: {key.replace('_', ' ')}.", value=worker.memory[key])
        if service.batcher is not None:
            b = service.batcher
            yield GaugeMetricFamily("tkr_queue_depth", "Items waiting for the worker.", value=b.depth)
            yield CounterMetricFamily("tkr_items_dropped", "Queued items dropped because their client left.",
                                      value=b.items_dropped)
            yield CounterMetricFamily("tkr_padded_tokens", "Tokens computed including padding.", value=b.padded_tokens)
        sizes = service.batch_sizes() if service.ready else None
        if sizes is not None:  # counted by the engine process (several front ends)
            yield _histogram("tkr_batch_size", "Items per forward pass.", sizes, BATCH_BUCKETS)
        if service.loaded is not None:
            load = GaugeMetricFamily("tkr_model_load_seconds", "How long the model took to load.", labels=["model"])
            load.add_metric([service.model_id], service.loaded.load_seconds)
            yield load


def _histogram(name: str, doc: str, counts: dict[int, int], buckets) -> HistogramMetricFamily:
    """A Prometheus histogram from exact counts per value."""
    cumulative = [(str(float(b)), sum(n for v, n in counts.items() if v <= b)) for b in buckets]
    cumulative.append(("+Inf", sum(counts.values())))
    return HistogramMetricFamily(name, doc, buckets=cumulative,
                                 sum_value=float(sum(v * n for v, n in counts.items())))


def is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
