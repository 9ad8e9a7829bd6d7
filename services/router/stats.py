"""Per-plugin request counters and latency histograms, kept in memory.

The dispatcher calls :meth:`PluginStats.observe` once per request it hands to a plugin.
Numbers are cumulative for the life of the process and survive reloads (a plugin's
counters keep growing across generations), so a monitoring exporter can turn them into
Prometheus counters and a histogram without resets:

    stats = kernel.services["router"].stats          # a RouteStats
    for plugin, numbers in stats.snapshot().items():
        numbers["requests"], numbers["by_class"]["5xx"], numbers["buckets"]  # ...

Everything runs on the event loop, so no locking is needed.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

__all__ = ["CLASSES", "DEFAULT_BUCKETS", "PluginStats", "RouteStats"]

#: Upper bounds (seconds, inclusive) of the latency buckets; a last +Inf bucket is implied.
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
_CLASSES = CLASSES


class PluginStats:
    """Request count by status class, errors, latency sum and buckets of one plugin."""

    __slots__ = (
        "bounds",
        "buckets",
        "by_class",
        "by_route",
        "errors",
        "latency_sum",
        "plugin",
        "requests",
    )

    def __init__(self, plugin: str, bounds: Sequence[float] = DEFAULT_BUCKETS) -> None:
        self.plugin = plugin
        self.bounds: tuple[float, ...] = tuple(bounds)
        #: Requests answered (or failed) so far.
        self.requests = 0
        #: Requests answered with 5xx, or whose handler raised.
        self.errors = 0
        #: Counts by status class: index 1 is 1xx ... index 5 is 5xx.
        self.by_class = [0, 0, 0, 0, 0, 0]
        self.latency_sum = 0.0
        #: Non-cumulative counts per bucket; the last one is +Inf.
        self.buckets = [0] * (len(self.bounds) + 1)
        #: Requests by (route template, method, status class index 1..5).
        self.by_route: dict[tuple[str, str, int], int] = {}

    def observe(
        self, status: int, seconds: float, method: str = "GET", route: str = "unmatched"
    ) -> None:
        """Count one request; ``status`` 500 is used for a handler that raised.

        ``route`` is the route's template (``/app/items/{id}``), never the raw path, so
        the number of series stays bounded by the plugin's routes.
        """
        self.requests += 1
        cls = status // 100
        cls = cls if 1 <= cls <= 5 else 5
        self.by_class[cls] += 1
        key = (route, method, cls)
        self.by_route[key] = self.by_route.get(key, 0) + 1
        if status >= 500 or status < 100:
            self.errors += 1
        self.latency_sum += seconds
        self.buckets[bisect_left(self.bounds, seconds)] += 1

    def quantile(self, q: float) -> float | None:
        """Estimated ``q`` quantile (0..1) of the latency in seconds; None before any request.

        Linear interpolation inside the bucket holding the rank (as Prometheus'
        ``histogram_quantile``); a rank in the +Inf bucket gives the largest finite bound.
        """
        total = sum(self.buckets)
        if total == 0:
            return None
        rank = q * total
        seen = 0
        for i, count in enumerate(self.buckets):
            if count and seen + count >= rank:
                if i == len(self.bounds):
                    return self.bounds[-1]
                lower = self.bounds[i - 1] if i > 0 else 0.0
                upper = self.bounds[i]
                return lower + (upper - lower) * max(0.0, rank - seen) / count
            seen += count
        return self.bounds[-1]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready copy of the numbers."""
        p50, p99 = self.quantile(0.5), self.quantile(0.99)
        return {
            "requests": self.requests,
            "errors": self.errors,
            "by_class": {name: self.by_class[i + 1] for i, name in enumerate(_CLASSES)},
            "by_route": [
                {"route": r, "method": m, "status_class": _CLASSES[c - 1], "requests": n}
                for (r, m, c), n in sorted(self.by_route.items())
            ],
            "latency_sum_s": self.latency_sum,
            "bucket_bounds_s": list(self.bounds),
            "buckets": list(self.buckets),
            "p50_ms": None if p50 is None else p50 * 1000,
            "p99_ms": None if p99 is None else p99 * 1000,
        }


class RouteStats:
    """The :class:`PluginStats` of every plugin the dispatcher served, by plugin name."""

    def __init__(self, bounds: Sequence[float] = DEFAULT_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        if list(self.bounds) != sorted(set(self.bounds)) or not self.bounds:
            raise ValueError(f"latency bucket bounds must be increasing: {list(bounds)}")
        self._plugins: dict[str, PluginStats] = {}
        #: Requests that matched no plugin prefix (answered 404 by the dispatcher).
        self.unmatched = 0

    def plugin(self, name: str) -> PluginStats:
        """The stats of plugin ``name`` (created on first use)."""
        stats = self._plugins.get(name)
        if stats is None:
            stats = self._plugins[name] = PluginStats(name, self.bounds)
        return stats

    def find(self, name: str) -> PluginStats | None:
        return self._plugins.get(name)

    def plugins(self) -> list[PluginStats]:
        return list(self._plugins.values())

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Every plugin's numbers as plain data, by plugin name."""
        return {name: stats.as_dict() for name, stats in self._plugins.items()}
