"""The monitor's projections: counters folded from the log, so they survive a restart.

:class:`Counters` folds the events it counts (by type, too): plugin loads/reloads/failures and which plugins are loaded or failed, task runs
by outcome with duration and lateness histograms, retries, skips, misses, sandbox
events by type (the types of ``services/sandbox/events.py``, its public contract, so the
sandbox's runtime is never imported), alerts.
Prometheus counters built from it never go back to zero behind Prometheus' back: a
restart folds the same log (from a snapshot) to the same numbers.

:class:`AlertBook` folds ``AlertRaised``/``AlertResolved``: the open alerts and the
recent ones (``GET /admin/alerts``), and the alert engine's "once per episode" memory.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from typing import Any

from kernel.events import Recorded
from kernel.projections import Projection, handles

__all__ = ["DURATION_BUCKETS", "LATENESS_BUCKETS", "AlertBook", "Counters", "Histogram"]

#: seconds
DURATION_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
LATENESS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0)


class Histogram:
    """Non-cumulative bucket counts (+Inf last) and the sum; JSON-ready with ``dump``."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...], data: dict[str, Any] | None = None) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        if data is not None and len(data.get("counts", ())) == len(self.counts):
            self.counts = [int(c) for c in data["counts"]]
            self.sum = float(data["sum"])

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            total += n
            out.append((bound, float(total)))
        return out

    def dump(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "sum": self.sum}


def _sandbox_types() -> tuple[str, ...]:
    """The sandbox's event types (its public contract), counted by name."""
    try:
        from services.sandbox import events
    except ImportError:  # the sandbox service is not installed
        return ()
    names = (getattr(v, "type_name", "") for v in vars(events).values() if isinstance(v, type))
    return tuple(sorted(n for n in names if isinstance(n, str) and n.startswith("Sandbox")))


_SANDBOX_TYPES = _sandbox_types()


def _task_plugin(task: str) -> str:
    return task.split(".", 1)[0]


class _Task:
    __slots__ = ("duration", "lateness", "missed", "outcomes", "retries", "skips", "started")

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        data = data or {}
        self.started: int = data.get("started", 0)
        self.outcomes: dict[str, int] = dict(data.get("outcomes", {}))
        self.retries: int = data.get("retries", 0)
        self.skips: int = data.get("skips", 0)
        self.missed: int = data.get("missed", 0)
        self.duration = Histogram(DURATION_BUCKETS, data.get("duration"))
        self.lateness = Histogram(LATENESS_BUCKETS, data.get("lateness"))

    def dump(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "outcomes": self.outcomes,
            "retries": self.retries,
            "skips": self.skips,
            "missed": self.missed,
            "duration": self.duration.dump(),
            "lateness": self.lateness.dump(),
        }


_PLUGIN_COUNTS = ("loads", "reloads", "load_failures", "reload_failures", "unloads")


class Counters(Projection):
    """See the module docstring."""

    name = "monitor.counters"
    schema = 1
    snapshot_every = 2000

    def reset(self) -> None:
        self.events: dict[str, int] = {}
        self.plugins: dict[str, dict[str, int]] = {}
        #: plugin -> serving generation
        self.loaded: dict[str, int] = {}
        #: plugin -> the error of its last failed load (cleared by a load)
        self.failed: dict[str, str] = {}
        self.tasks: dict[str, _Task] = {}
        #: "plugin\ttype" -> count of Sandbox* events
        self.sandbox: dict[str, int] = {}
        self.alerts_raised: dict[str, int] = {}
        self.notifications_failed: dict[str, int] = {}
        #: the newest lateness seen (seconds) and when
        self.last_lateness = 0.0

    def apply(self, record: Recorded) -> None:
        events = self.events
        events[record.type] = events.get(record.type, 0) + 1
        super().apply(record)

    @handles(*_SANDBOX_TYPES)
    def _sandbox_event(self, r: Recorded) -> None:
        plugin = str(r.data.get("plugin") or r.data.get("name") or "")
        key = f"{plugin}\t{r.type}"
        self.sandbox[key] = self.sandbox.get(key, 0) + 1

    @handles("AlertResolved", "KernelStarted", "KernelStopped", "SubscriberFailed")
    def _counted(self, r: Recorded) -> None:
        """Counted by type only (in ``apply``)."""

    # -- plugins -----------------------------------------------------------------------

    def _plugin(self, name: str) -> dict[str, int]:
        p = self.plugins.get(name)
        if p is None:
            p = self.plugins[name] = dict.fromkeys(_PLUGIN_COUNTS, 0)
        return p

    @handles("PluginLoaded")
    def _loaded(self, r: Recorded) -> None:
        name = r.data["name"]
        self._plugin(name)["loads"] += 1
        self.loaded[name] = r.data.get("generation", 0)
        self.failed.pop(name, None)

    @handles("PluginReloaded")
    def _reloaded(self, r: Recorded) -> None:
        self._plugin(r.data["name"])["reloads"] += 1

    @handles("PluginLoadFailed")
    def _load_failed(self, r: Recorded) -> None:
        name = r.data["name"]
        self._plugin(name)["load_failures"] += 1
        if name not in self.loaded:
            self.failed[name] = f"{r.data.get('stage', '?')}: {r.data.get('error', '')}"[:500]

    @handles("PluginReloadFailed")
    def _reload_failed(self, r: Recorded) -> None:
        self._plugin(r.data["name"])["reload_failures"] += 1

    @handles("PluginUnloaded")
    def _unloaded(self, r: Recorded) -> None:
        name = r.data["name"]
        self._plugin(name)["unloads"] += 1
        if self.loaded.get(name) == r.data.get("generation"):
            del self.loaded[name]

    @handles("PluginUninstalled")
    def _uninstalled(self, r: Recorded) -> None:
        self.failed.pop(r.data["name"], None)

    # -- tasks -------------------------------------------------------------------------

    def _task(self, task: str) -> _Task:
        t = self.tasks.get(task)
        if t is None:
            t = self.tasks[task] = _Task()
        return t

    @handles("TaskStarted")
    def _started(self, r: Recorded) -> None:
        t = self._task(r.data["task"])
        t.started += 1
        if r.data.get("trigger", "schedule") == "schedule" and r.data.get("attempt", 1) == 1:
            late = max(0.0, r.timestamp - float(r.data.get("scheduled_for") or r.timestamp))
            t.lateness.observe(late)
            self.last_lateness = late

    @handles("TaskSucceeded")
    def _succeeded(self, r: Recorded) -> None:
        t = self._task(r.data["task"])
        t.outcomes["succeeded"] = t.outcomes.get("succeeded", 0) + 1
        t.duration.observe(float(r.data.get("duration_ms", 0.0)) / 1000)

    @handles("TaskFailed")
    def _failed(self, r: Recorded) -> None:
        t = self._task(r.data["task"])
        outcome = "failed" if r.data.get("kind", "error") == "error" else r.data["kind"]
        t.outcomes[outcome] = t.outcomes.get(outcome, 0) + 1
        t.duration.observe(float(r.data.get("duration_ms", 0.0)) / 1000)

    @handles("TaskRetryScheduled")
    def _retry(self, r: Recorded) -> None:
        self._task(r.data["task"]).retries += 1

    @handles("TaskReleased")
    def _released(self, r: Recorded) -> None:
        # a claim given up at a restart (its code never ran): its instant runs again
        t = self._task(r.data["task"])
        t.outcomes["released"] = t.outcomes.get("released", 0) + 1

    @handles("TaskSkipped")
    def _skipped(self, r: Recorded) -> None:
        self._task(r.data["task"]).skips += 1

    @handles("TaskMissed")
    def _missed(self, r: Recorded) -> None:
        self._task(r.data["task"]).missed += int(r.data.get("count", 1))

    # -- monitor -----------------------------------------------------------------------

    @handles("AlertRaised")
    def _alert(self, r: Recorded) -> None:
        rule = r.data.get("rule", "?")
        self.alerts_raised[rule] = self.alerts_raised.get(rule, 0) + 1

    @handles("NotificationFailed")
    def _notification_failed(self, r: Recorded) -> None:
        sink = str(r.data.get("sink", "?")).split(" ", 1)[0]
        self.notifications_failed[sink] = self.notifications_failed.get(sink, 0) + 1

    # -- snapshots -----------------------------------------------------------------------

    def snapshot(self) -> Any:
        return {
            "events": self.events,
            "plugins": self.plugins,
            "loaded": self.loaded,
            "failed": self.failed,
            "tasks": {k: t.dump() for k, t in self.tasks.items()},
            "sandbox": self.sandbox,
            "alerts_raised": self.alerts_raised,
            "notifications_failed": self.notifications_failed,
            "last_lateness": self.last_lateness,
        }

    def restore(self, state: Any) -> None:
        self.reset()
        self.events = dict(state["events"])
        self.plugins = {k: dict(v) for k, v in state["plugins"].items()}
        self.loaded = dict(state["loaded"])
        self.failed = dict(state["failed"])
        self.tasks = {k: _Task(v) for k, v in state["tasks"].items()}
        self.sandbox = dict(state["sandbox"])
        self.alerts_raised = dict(state["alerts_raised"])
        self.notifications_failed = dict(state["notifications_failed"])
        self.last_lateness = float(state.get("last_lateness", 0.0))

    def task_plugin(self, task: str) -> str:
        return _task_plugin(task)


class AlertBook(Projection):
    """Open alerts by key and the most recent episodes."""

    name = "monitor.alerts"
    schema = 1
    snapshot_every = 200
    RECENT = 200

    def reset(self) -> None:
        self.open: dict[str, dict[str, Any]] = {}
        self.recent: deque[dict[str, Any]] = deque(maxlen=self.RECENT)

    @handles("AlertRaised")
    def _raised(self, r: Recorded) -> None:
        alert = {
            **r.data,
            "position": r.position,
            "raised_at": r.timestamp,
            "resolved_at": None,
            "resolution": None,
        }
        self.open[r.data["key"]] = alert
        self.recent.append(alert)

    @handles("AlertResolved")
    def _resolved(self, r: Recorded) -> None:
        alert = self.open.pop(r.data["key"], None)
        if alert is not None:
            alert["resolved_at"] = r.timestamp
            alert["resolution"] = r.data.get("reason")

    def snapshot(self) -> Any:
        return {"open": list(self.open.values()), "recent": list(self.recent)}

    def restore(self, state: Any) -> None:
        self.reset()
        for alert in state["recent"]:
            self.recent.append(alert)
        # the same dict in both places, so resolving an open alert updates its recent entry
        by_position = {a["position"]: a for a in self.recent}
        for alert in state["open"]:
            self.open[alert["key"]] = by_position.get(alert["position"], alert)
