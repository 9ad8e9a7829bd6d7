"""``GET /metrics``: Prometheus text built from projections, never from a walk of the log.

A scrape reads the :class:`~.projection.Counters` projection (kept current by the
kernel as events are appended), the router's in-memory request numbers plus their
saved totals, the append timer, subscription positions and the log store's counts:
its cost grows with the number of plugins, tasks and routes, not with the log.

Series (prometheus-client naming: ``_total`` counters, ``_seconds`` histograms)::

    xcore_http_requests_total{plugin,route,method,status_class}
    xcore_http_request_duration_seconds{plugin}                 histogram
    xcore_plugin_loads_total / _reloads_total / _load_failures_total /
        _reload_failures_total / _unloads_total {plugin};  xcore_plugin_loaded{plugin}
    xcore_task_runs_total{plugin,task,outcome}; xcore_task_starts_total{plugin,task}
    xcore_task_run_duration_seconds{plugin,task}, xcore_task_lateness_seconds{plugin,task}
    xcore_task_retries_total / _skips_total / _missed_total {plugin,task}
    xcore_events_appended_total{type}; xcore_log_position
    xcore_event_append_duration_seconds; xcore_event_append_failures_total
    xcore_subscriber_lag_events{subscriber}; xcore_projection_lag_events{projection}
    xcore_sandbox_events_total{plugin,type}
    xcore_alerts_raised_total{rule}; xcore_alerts_open; xcore_notifications_failed_total{sink}
    xcore_log_lines_stored; xcore_log_lines_dropped_total
    xcore_uptime_seconds; xcore_start_time_seconds
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from services.monitor.projection import Histogram

if TYPE_CHECKING:
    from services.monitor.service import MonitorService

__all__ = ["MonitorCollector", "Sample"]

_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class Sample:
    """Numbers that need an await (positions), gathered before the synchronous collect."""

    def __init__(self, last_position: int, lags: dict[str, dict[str, int]]) -> None:
        self.last_position = last_position
        self.lags = lags


def _histogram(family: HistogramMetricFamily, labels: list[str], h: Histogram) -> None:
    family.add_metric(labels, h.cumulative(), h.sum)


class MonitorCollector(Collector):
    def __init__(self, monitor: MonitorService) -> None:
        self.monitor = monitor
        self.sample: Sample | None = None

    def collect(self) -> Iterator[Metric]:
        m = self.monitor
        c = m.counters
        sample = self.sample

        # -- HTTP ---------------------------------------------------------------------
        requests = CounterMetricFamily(
            "xcore_http_requests",
            "HTTP requests to plugin routes",
            labels=["plugin", "route", "method", "status_class"],
        )
        latency = HistogramMetricFamily(
            "xcore_http_request_duration_seconds",
            "Latency of plugin HTTP requests",
            labels=["plugin"],
        )
        for plugin, totals in sorted(m.http_totals().items()):
            for key, n in sorted(totals["by_route"].items()):
                route, method, cls = key.split("\t")
                requests.add_metric([plugin, route, method, _CLASSES[int(cls) - 1]], n)
            bounds = totals["bounds"]
            if bounds and totals["buckets"]:
                h = Histogram(tuple(bounds))
                h.counts, h.sum = list(totals["buckets"]), totals["sum"]
                _histogram(latency, [plugin], h)
        yield requests
        yield latency

        # -- plugins ------------------------------------------------------------------
        families = {
            key: CounterMetricFamily(
                f"xcore_plugin_{key}", f"Plugin {key.replace('_', ' ')}", labels=["plugin"]
            )
            for key in ("loads", "reloads", "load_failures", "reload_failures", "unloads")
        }
        for plugin, numbers in sorted(c.plugins.items()):
            for key, family in families.items():
                family.add_metric([plugin], numbers.get(key, 0))
        yield from families.values()
        loaded = GaugeMetricFamily(
            "xcore_plugin_loaded", "1 while the plugin is loaded", labels=["plugin"]
        )
        for plugin in sorted(set(c.plugins) | set(c.loaded)):
            loaded.add_metric([plugin], 1 if plugin in c.loaded else 0)
        yield loaded

        # -- tasks --------------------------------------------------------------------
        runs = CounterMetricFamily(
            "xcore_task_runs", "Finished task runs by outcome", labels=["plugin", "task", "outcome"]
        )
        starts = CounterMetricFamily(
            "xcore_task_starts", "Task runs started", labels=["plugin", "task"]
        )
        retries = CounterMetricFamily(
            "xcore_task_retries", "Task retries scheduled", labels=["plugin", "task"]
        )
        skips = CounterMetricFamily(
            "xcore_task_skips", "Task runs skipped", labels=["plugin", "task"]
        )
        missed = CounterMetricFamily(
            "xcore_task_missed", "Task runs missed while down", labels=["plugin", "task"]
        )
        durations = HistogramMetricFamily(
            "xcore_task_run_duration_seconds", "Duration of task runs", labels=["plugin", "task"]
        )
        lateness = HistogramMetricFamily(
            "xcore_task_lateness_seconds",
            "Start time minus due time of scheduled runs",
            labels=["plugin", "task"],
        )
        for task, t in sorted(c.tasks.items()):
            plugin = c.task_plugin(task)
            labels = [plugin, task]
            for outcome, n in sorted(t.outcomes.items()):
                runs.add_metric([*labels, outcome], n)
            starts.add_metric(labels, t.started)
            retries.add_metric(labels, t.retries)
            skips.add_metric(labels, t.skips)
            missed.add_metric(labels, t.missed)
            _histogram(durations, labels, t.duration)
            _histogram(lateness, labels, t.lateness)
        yield from (runs, starts, retries, skips, missed, durations, lateness)

        # -- kernel -------------------------------------------------------------------
        appended = CounterMetricFamily(
            "xcore_events_appended", "Events in the log by type", labels=["type"]
        )
        for type_name, n in sorted(c.events.items()):
            appended.add_metric([type_name], n)
        yield appended
        if sample is not None:
            yield GaugeMetricFamily(
                "xcore_log_position", "Position of the newest event", value=sample.last_position
            )
            sub_lag = GaugeMetricFamily(
                "xcore_subscriber_lag_events",
                "Events a subscriber has yet to handle",
                labels=["subscriber"],
            )
            for name, lag in sorted(sample.lags["subscribers"].items()):
                sub_lag.add_metric([name], lag)
            yield sub_lag
            proj_lag = GaugeMetricFamily(
                "xcore_projection_lag_events",
                "Events a projection has yet to fold",
                labels=["projection"],
            )
            for name, lag in sorted(sample.lags["projections"].items()):
                proj_lag.add_metric([name], lag)
            yield proj_lag
        append = HistogramMetricFamily(
            "xcore_event_append_duration_seconds", "Time from append to durable"
        )
        append.add_metric([], m.append_timer.histogram.cumulative(), m.append_timer.histogram.sum)
        yield append
        yield CounterMetricFamily(
            "xcore_event_append_failures", "Appends that raised", value=m.append_timer.failures
        )
        yield GaugeMetricFamily(
            "xcore_uptime_seconds",
            "Seconds since this kernel started",
            value=time.time() - m.started_at,
        )
        yield GaugeMetricFamily(
            "xcore_start_time_seconds", "Unix time this kernel started", value=m.started_at
        )

        # -- sandbox, alerts, logs ----------------------------------------------------------
        sandbox = CounterMetricFamily(
            "xcore_sandbox_events", "Sandbox events by plugin and type", labels=["plugin", "type"]
        )
        for key, n in sorted(c.sandbox.items()):
            plugin, type_name = key.split("\t", 1)
            sandbox.add_metric([plugin, type_name], n)
        yield sandbox
        raised = CounterMetricFamily(
            "xcore_alerts_raised", "Alerts raised by rule", labels=["rule"]
        )
        for rule, n in sorted(c.alerts_raised.items()):
            raised.add_metric([rule], n)
        yield raised
        yield GaugeMetricFamily("xcore_alerts_open", "Alerts open now", value=len(m.alerts.open))
        failed = CounterMetricFamily(
            "xcore_notifications_failed", "Notifications not delivered", labels=["sink"]
        )
        for sink, n in sorted(c.notifications_failed.items()):
            failed.add_metric([sink], n)
        yield failed
        logs = m.logs.describe()
        yield GaugeMetricFamily(
            "xcore_log_lines_stored", "Log lines in the store", value=logs["stored"]
        )
        yield CounterMetricFamily(
            "xcore_log_lines_dropped",
            "Log lines dropped (bounds, full buffer)",
            value=logs["dropped"],
        )


def stats_json(monitor: MonitorService, sample: Sample) -> dict[str, Any]:
    """The same numbers as ``/metrics``, as JSON for ``GET /admin/stats``."""
    c = monitor.counters
    tasks = {}
    for task, t in sorted(c.tasks.items()):
        tasks[task] = {
            "plugin": c.task_plugin(task),
            "started": t.started,
            "outcomes": t.outcomes,
            "retries": t.retries,
            "skips": t.skips,
            "missed": t.missed,
            "duration_s": {"count": t.duration.count, "sum": t.duration.sum},
            "lateness_s": {"count": t.lateness.count, "sum": t.lateness.sum},
        }
    http = {}
    for plugin, totals in sorted(monitor.http_totals().items()):
        routes = []
        for key, n in sorted(totals["by_route"].items()):
            route, method, cls = key.split("\t")
            routes.append(
                {
                    "route": route,
                    "method": method,
                    "status_class": _CLASSES[int(cls) - 1],
                    "requests": n,
                }
            )
        http[plugin] = {
            "requests": sum(r["requests"] for r in routes),
            "routes": routes,
            "latency_sum_s": totals["sum"],
        }
    timer = monitor.append_timer
    return {
        "uptime_s": time.time() - monitor.started_at,
        "log": {
            "last_position": sample.last_position,
            "events_by_type": dict(sorted(c.events.items())),
            "append": {
                "count": timer.histogram.count,
                "failures": timer.failures,
                "p50_ms": None if (q := timer.quantile(0.5)) is None else q * 1000,
                "p99_ms": None if (q := timer.quantile(0.99)) is None else q * 1000,
            },
        },
        "lag": sample.lags,
        "plugins": {
            name: {**numbers, "loaded": name in c.loaded}
            for name, numbers in sorted(c.plugins.items())
        },
        "failed_plugins": c.failed,
        "http": http,
        "tasks": tasks,
        "sandbox": {k.replace("\t", " "): n for k, n in sorted(c.sandbox.items())},
        "alerts": {"open": len(monitor.alerts.open), "raised_by_rule": c.alerts_raised},
        "notifications_failed": c.notifications_failed,
        "logs": monitor.logs.describe(),
    }
