"""Request statistics for /admin/stats: counts by route and status, items, latency percentiles,
rate-limit rejections. In memory, per process (Prometheus metrics are the multi-replica view)."""

from __future__ import annotations

import time
from collections import Counter, deque


class RequestStats:
    def __init__(self, window: int = 10_000):
        self.started_at = time.time()
        self.by_route: Counter[tuple[str, int]] = Counter()
        self.items = 0
        self.rate_limited = 0
        self._latencies: deque[float] = deque(maxlen=window)  # seconds, most recent requests
        self.by_user: Counter[tuple[str, str]] = Counter()  # (key id, OpenAI "user") -> items
        self.metrics = None  # api.metrics.Metrics, when the app exports Prometheus metrics

    def record(self, route: str, status: int, seconds: float, items: int) -> None:
        self.by_route[(route, status)] += 1
        self.items += items
        self._latencies.append(seconds)
        if self.metrics is not None:
            self.metrics.observe_request(route, status, seconds)

    def record_rate_limited(self) -> None:
        self.rate_limited += 1
        if self.metrics is not None:
            self.metrics.rate_limited.inc()

    def record_user(self, key_id: str | None, user: str, items: int) -> None:
        if len(self.by_user) < 100_000 or (key_id or "anonymous", user) in self.by_user:
            self.by_user[(key_id or "anonymous", user)] += items

    def snapshot(self) -> dict:
        lat = sorted(self._latencies)

        def pct(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 3) if lat else None

        routes: dict[str, dict[str, int]] = {}
        for (route, status), n in sorted(self.by_route.items()):
            routes.setdefault(route, {})[str(status)] = n
        return {
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "requests": sum(self.by_route.values()),
            "items": self.items,
            "rate_limit_rejections": self.rate_limited,
            "by_route": routes,
            "by_user": [{"key_id": k, "user": u, "items": n} for (k, u), n in self.by_user.most_common(100)],
            "latency_ms": {"p50": pct(0.5), "p95": pct(0.95), "p99": pct(0.99), "window": len(lat)},
        }
