"""In-process measurements that are not events: append latency, HTTP request counts.

Guarantee: these counters keep growing across restarts like the ones folded from the
log: their totals are saved in the log store's state table every ``flush_every``
seconds and when the service stops, and added back at start. (A kill -9 loses at most
the last ``flush_every`` seconds of increments; Prometheus sees that as a reset, which
``rate()`` handles.)

:class:`AppendTimer` wraps the store's ``append`` on this kernel's store instance
(restored at stop) to time every append and remember whether the last one failed:
that is the "writable" and "append latency" of ``/health``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from kernel.store.base import EventStore
from services.monitor.projection import Histogram

__all__ = ["APPEND_BUCKETS", "AppendTimer", "HttpTotals"]

APPEND_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


class AppendTimer:
    """Times every append of ``store``; see the module docstring."""

    def __init__(self, base: dict[str, Any] | None = None) -> None:
        self.histogram = Histogram(APPEND_BUCKETS, (base or {}).get("histogram"))
        self.failures = int((base or {}).get("failures", 0))
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.last_ok_at: float | None = None
        self.last_seconds: float | None = None
        self._store: EventStore | None = None

    def install(self, store: EventStore) -> None:
        original: Callable[..., Awaitable[Any]] = store.append
        timer = self

        async def timed_append(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                result = await original(*args, **kwargs)
            except Exception as exc:
                if type(exc).__name__ != "ConcurrencyError":  # a refused version is not a fault
                    timer.failures += 1
                    timer.last_error = f"{type(exc).__name__}: {exc}"
                    timer.last_error_at = time.time()
                raise
            seconds = time.perf_counter() - start
            timer.histogram.observe(seconds)
            timer.last_seconds = seconds
            timer.last_ok_at = time.time()
            timer.last_error = None
            return result

        store.append = timed_append  # type: ignore[method-assign]
        self._store = store

    def uninstall(self) -> None:
        if self._store is not None:
            vars(self._store).pop("append", None)
            self._store = None

    def quantile(self, q: float) -> float | None:
        total = self.histogram.count
        if not total:
            return None
        rank, seen = q * total, 0
        for bound, n in zip(
            (*self.histogram.bounds, float("inf")), self.histogram.counts, strict=True
        ):
            seen += n
            if seen >= rank:
                return bound if bound != float("inf") else self.histogram.bounds[-1]
        return self.histogram.bounds[-1]

    def dump(self) -> dict[str, Any]:
        return {"histogram": self.histogram.dump(), "failures": self.failures}


class HttpTotals:
    """The router's per-plugin request numbers plus the totals saved before this boot."""

    def __init__(self, base: dict[str, Any] | None) -> None:
        #: plugin -> {"by_route": {"route\\tmethod\\tcls": n}, "buckets": [...], "sum": s}
        self.base: dict[str, dict[str, Any]] = base or {}

    def merged(self, stats: Any) -> dict[str, dict[str, Any]]:
        """Totals by plugin: the saved base plus ``stats`` (a RouteStats, or None)."""
        out: dict[str, dict[str, Any]] = {}
        for plugin, saved in self.base.items():
            out[plugin] = {
                "by_route": dict(saved.get("by_route", {})),
                "buckets": list(saved.get("buckets", [])),
                "sum": float(saved.get("sum", 0.0)),
                "bounds": list(saved.get("bounds", [])),
            }
        for ps in stats.plugins() if stats is not None else ():
            entry = out.setdefault(
                ps.plugin, {"by_route": {}, "buckets": [], "sum": 0.0, "bounds": []}
            )
            if entry["bounds"] != list(ps.bounds):
                # saved with other bucket bounds: the histogram restarts, counts do not
                entry["bounds"], entry["buckets"], entry["sum"] = list(ps.bounds), [], 0.0
            if not entry["buckets"]:
                entry["buckets"] = [0] * len(ps.buckets)
            entry["buckets"] = [a + b for a, b in zip(entry["buckets"], ps.buckets, strict=True)]
            entry["sum"] += ps.latency_sum
            by_route = entry["by_route"]
            for (route, method, cls), n in ps.by_route.items():
                key = f"{route}\t{method}\t{cls}"
                by_route[key] = by_route.get(key, 0) + n
        return out
