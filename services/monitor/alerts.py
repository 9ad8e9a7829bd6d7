"""Alerts: rules from settings, one ``AlertRaised`` per episode, ``AlertResolved`` when it ends.

Guarantee: however many failures follow, a rule raises one alert per key (a task, a
plugin, a subscriber) until the episode ends — a success, a load, the lag clearing —
which records ``AlertResolved``. Which alerts are open is the :class:`AlertBook`
projection, so a restart neither repeats an open alert nor forgets to resolve it.

Mechanism: a named subscription (checkpointed, so a restart resumes where it stopped
and an alert is notified once) sees the events the rules watch. Failure rules keep the
times of recent failures per key (event time, so catching up after a restart counts
as it happened) and raise when ``threshold`` fall within ``window`` seconds. Lag rules
are checked every ``check_every`` seconds. Every ``AlertRaised``/``AlertResolved`` the
subscription sees is written to the log (the log sink) and handed to the notifier
(webhooks), which never blocks this loop.
"""

from __future__ import annotations

import fnmatch
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kernel.events import Recorded
from services.monitor.events import STREAM, AlertRaised, AlertResolved
from services.monitor.projection import AlertBook
from services.monitor.settings import AlertRule

if TYPE_CHECKING:
    from kernel.kernel import Kernel

__all__ = ["WATCHED", "AlertEngine"]

log = logging.getLogger("xcore.monitor.alerts")

WATCHED = (
    "TaskFailed",
    "TaskSucceeded",
    "TaskStarted",
    "PluginLoadFailed",
    "PluginReloadFailed",
    "PluginLoaded",
    "PluginReloaded",
    "PluginUninstalled",
    "AlertRaised",
    "AlertResolved",
)


_WATCHED_SET = frozenset(WATCHED)


def _is_circuit_open(type_name: str) -> bool:
    return type_name.startswith("Sandbox") and "Circuit" in type_name and "Open" in type_name


def _is_circuit_closed(type_name: str) -> bool:
    return (
        type_name.startswith("Sandbox")
        and "Circuit" in type_name
        and ("Close" in type_name or "Reset" in type_name)
    )


class AlertEngine:
    """Evaluates the rules; see the module docstring."""

    def __init__(
        self,
        kernel: Kernel,
        rules: tuple[AlertRule, ...],
        book: AlertBook,
        notify: Callable[[Recorded], None],
    ) -> None:
        self.kernel = kernel
        self.rules = rules
        self.book = book
        self.notify = notify
        self._windows: dict[str, deque[float]] = {}
        #: keys raised by this engine and not yet resolved (the book may lag behind)
        self._open: set[str] = set(book.open)

    def _rules(self, kind: str, subject: str) -> list[AlertRule]:
        return [r for r in self.rules if r.kind == kind and fnmatch.fnmatchcase(subject, r.match)]

    async def on_event(self, record: Recorded) -> None:
        t, d = record.type, record.data
        if t not in _WATCHED_SET and not t.startswith("Sandbox"):
            return
        if t in ("AlertRaised", "AlertResolved"):
            self._announce(record)
            return
        if t == "TaskFailed":
            await self._failure("task_failures", d["task"], record)
        elif t == "TaskSucceeded":
            await self._resolve("task_failures", d["task"], "the task succeeded", record)
        elif t == "TaskStarted":
            await self._lateness(record)
        elif t in ("PluginLoadFailed", "PluginReloadFailed"):
            await self._failure("plugin_failures", d["name"], record)
            if t == "PluginLoadFailed":
                await self._failure("plugin_load_failed", d["name"], record)
        elif t in ("PluginLoaded", "PluginReloaded", "PluginUninstalled"):
            reason = (
                "the plugin was uninstalled" if t == "PluginUninstalled" else "the plugin loaded"
            )
            await self._resolve("plugin_failures", d["name"], reason, record)
            await self._resolve("plugin_load_failed", d["name"], reason, record)
            # a sandbox's circuit stays open until the plugin is loaded again
            await self._resolve("sandbox_circuit", d["name"], reason, record)
        elif _is_circuit_open(t):
            await self._failure("sandbox_circuit", str(d.get("plugin") or d.get("name")), record)
        elif _is_circuit_closed(t):
            subject = str(d.get("plugin") or d.get("name"))
            await self._resolve("sandbox_circuit", subject, "the circuit closed", record)

    async def _failure(self, kind: str, subject: str, record: Recorded) -> None:
        for rule in self._rules(kind, subject):
            key = f"{rule.name}:{subject}"
            window = self._windows.setdefault(key, deque())
            window.append(record.timestamp)
            while window and window[0] < record.timestamp - rule.window:
                window.popleft()
            if len(window) >= rule.threshold and key not in self._open:
                what = {"task_failures": "task", "sandbox_circuit": "sandbox of"}.get(
                    kind, "plugin"
                )
                await self._raise(
                    rule,
                    key,
                    subject,
                    len(window),
                    f"{what} {subject}: {len(window)} failure(s) within {rule.window:g}s"
                    f" ({record.type}: {str(record.data.get('error', ''))[:200]})",
                    record,
                )

    async def _lateness(self, record: Recorded) -> None:
        d = record.data
        if d.get("trigger", "schedule") != "schedule" or d.get("attempt", 1) != 1:
            return
        late = record.timestamp - float(d.get("scheduled_for") or record.timestamp)
        for rule in self._rules("scheduler_lag", d["task"]):
            key = f"{rule.name}:scheduler"
            if late > rule.bound and key not in self._open:
                await self._raise(
                    rule,
                    key,
                    "scheduler",
                    late,
                    f"task {d['task']} started {late:.1f}s late (bound {rule.bound:g}s)",
                    record,
                )
            elif late <= rule.bound and key in self._open:
                await self._resolve_key(rule, key, "scheduler", "runs start on time again", record)

    async def check_lag(self, lags: dict[str, int]) -> None:
        """Raise or resolve the subscriber_lag rules for these lags (by subscriber)."""
        for name, lag in lags.items():
            for rule in self._rules("subscriber_lag", name):
                key = f"{rule.name}:{name}"
                if lag > rule.bound and key not in self._open:
                    await self._raise(
                        rule,
                        key,
                        name,
                        lag,
                        f"subscriber {name} is {lag} events behind (bound {rule.bound:g})",
                        None,
                    )
                elif lag <= rule.bound and key in self._open:
                    await self._resolve_key(rule, key, name, "the subscriber caught up", None)

    async def _resolve(self, kind: str, subject: str, reason: str, record: Recorded) -> None:
        for rule in self._rules(kind, subject):
            key = f"{rule.name}:{subject}"
            self._windows.pop(key, None)
            if key in self._open:
                await self._resolve_key(rule, key, subject, reason, record)

    async def _raise(
        self,
        rule: AlertRule,
        key: str,
        subject: str,
        count: float,
        message: str,
        cause: Recorded | None,
    ) -> None:
        self._open.add(key)
        await self.kernel.append(
            AlertRaised(
                key=key,
                rule=rule.name,
                kind=rule.kind,
                subject=subject,
                count=count,
                window=rule.window,
                message=message,
            ),
            stream=STREAM,
            actor="monitor",
            cause=cause,
        )

    async def _resolve_key(
        self, rule: AlertRule, key: str, subject: str, reason: str, cause: Recorded | None
    ) -> None:
        self._open.discard(key)
        await self.kernel.append(
            AlertResolved(key=key, rule=rule.name, subject=subject, reason=reason),
            stream=STREAM,
            actor="monitor",
            cause=cause,
        )

    def _announce(self, record: Recorded) -> None:
        d: dict[str, Any] = record.data
        if record.type == "AlertRaised":
            self._open.add(d["key"])
            log.warning("alert raised: %s [%s]", d.get("message", d["key"]), d["key"])
        else:
            self._open.discard(d["key"])
            log.info("alert resolved: %s (%s)", d["key"], d.get("reason", ""))
        self.notify(record)
