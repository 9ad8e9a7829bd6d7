"""The monitor service: logs, metrics, health, the live streams, alerts and notifications.

It starts first (``order`` 5) so it captures the other services' log lines and times
every append from the beginning. Everything it runs in the background — the log
store's writer, the counters' saver, the lag checks, one delivery worker per webhook
— lives in one anyio task group owned by one task of the service: stopping the
service cancels the group and waits for it, so no task outlives the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from kernel.events import Recorded
from kernel.logging import add_sink, remove_sink
from services.monitor.alerts import AlertEngine
from services.monitor.api import admin_router, metrics_router
from services.monitor.logstore import LogStore
from services.monitor.metrics import Sample
from services.monitor.notify import Webhook
from services.monitor.probes import AppendTimer, HttpTotals
from services.monitor.projection import AlertBook, Counters
from services.monitor.settings import MonitorSettings
from services.monitor.streams import Streams

if TYPE_CHECKING:
    from kernel.kernel import Kernel
    from kernel.subscriptions import Subscription

__all__ = ["MonitorService"]

log = logging.getLogger("xcore.monitor")

ALERTS_SUBSCRIPTION = "monitor.alerts"


class MonitorService:
    """See the module docstring."""

    name = "monitor"
    order = 5

    def __init__(self, settings: MonitorSettings | None = None) -> None:
        self._settings = settings
        self._kernel: Kernel | None = None
        self.started_at = time.time()
        self._runner: asyncio.Task[None] | None = None
        self._subscription: Subscription | None = None
        self.webhooks: list[Webhook] = []

    @property
    def kernel(self) -> Kernel:
        if self._kernel is None:
            raise RuntimeError("the monitor service is not started")
        return self._kernel

    async def start(self, kernel: Kernel, stack: AsyncExitStack) -> None:
        self._kernel = kernel
        self.settings = settings = (
            self._settings
            if self._settings is not None
            else kernel.settings.section("monitor", MonitorSettings)
        )
        self.started_at = time.time()
        path = None if kernel.settings.store == "memory" else kernel.settings.data_dir / "logs.db"
        self.logs = LogStore(path, settings.logs)
        self.logs.bind(asyncio.get_running_loop())
        await anyio.to_thread.run_sync(self.logs.open)
        stack.push_async_callback(self._close_logs)
        add_sink(self.logs.sink)

        self.append_timer = AppendTimer(self.logs.load_state("append"))
        self.append_timer.install(kernel.store)
        self._http_base = HttpTotals(self.logs.load_state("http"))
        stack.push_async_callback(self._stop)

        self.counters = await kernel.add_projection(Counters())
        self.alerts = await kernel.add_projection(AlertBook())
        self.streams = Streams(settings.stream.heartbeat, settings.stream.page)

        kernel.http.add_router(metrics_router(self))
        kernel.http.add_admin_router(admin_router(self))
        kernel.http.add_health_check("store", self._store_health)
        if "plugins" not in kernel.http.health_checks:
            kernel.http.add_health_check("plugins", self._plugins_health)
        kernel.http.add_health_check("subscribers", self._subscribers_health)
        kernel.http.add_health_check("logs", self._logs_health)

        self.webhooks = [
            Webhook(kernel, w, settings.alerts.queue) for w in settings.alerts.webhooks
        ]
        self.engine = AlertEngine(kernel, settings.alerts.rules, self.alerts, self._notify)
        ready = anyio.Event()
        self._runner = asyncio.create_task(self._run(ready), name="xcore-monitor")
        await ready.wait()
        saved = await kernel.store.load_checkpoint(ALERTS_SUBSCRIPTION)
        self._subscription = await kernel.subscribe(
            self.engine.on_event,
            name=ALERTS_SUBSCRIPTION,
            start="checkpoint" if saved is not None else "now",
            # every type: the sandbox's circuit events are matched by name (the sandbox
            # service may register its types after this one starts)
        )

    # -- the task group ------------------------------------------------------------------

    async def _run(self, ready: anyio.Event) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.logs.run)
            tg.start_soon(self._save_counters_every, self.settings.flush_every)
            tg.start_soon(self._check_lag_every, self.settings.alerts.check_every)
            for hook in self.webhooks:
                tg.start_soon(hook.run)
            ready.set()

    async def _save_counters_every(self, interval: float) -> None:
        while True:
            await anyio.sleep(interval)
            try:
                await self.save_counters()
            except Exception:
                log.exception("could not save the monitor's counters")

    async def _check_lag_every(self, interval: float) -> None:
        while True:
            await anyio.sleep(interval)
            try:
                lags = (await self.sample()).lags["subscribers"]
                await self.engine.check_lag(lags)
            except Exception:
                log.exception("the lag check failed")

    async def save_counters(self) -> None:
        http = self.http_totals()
        append = self.append_timer.dump()

        def save() -> None:
            self.logs.save_state("http", http)
            self.logs.save_state("append", append)

        await anyio.to_thread.run_sync(save)

    async def _stop(self) -> None:
        if self._subscription is not None:
            await self.kernel.unsubscribe(self._subscription)
            self._subscription = None
        runner, self._runner = self._runner, None
        for hook in self.webhooks:
            hook.close()
        if runner is not None:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        try:
            await self.save_counters()
        except Exception:
            log.exception("could not save the monitor's counters at stop")
        self.append_timer.uninstall()

    async def _close_logs(self) -> None:
        remove_sink(self.logs.sink)
        await anyio.to_thread.run_sync(self.logs.close)

    # -- numbers -------------------------------------------------------------------------

    def http_totals(self) -> dict[str, dict[str, Any]]:
        router = self.kernel.services.get("router")
        return self._http_base.merged(getattr(router, "stats", None))

    async def sample(self) -> Sample:
        kernel = self.kernel
        last = await kernel.store.last_position()
        subscribers: dict[str, int] = {}
        for sub in getattr(kernel, "_subscriptions", ()):
            subscribers[sub.name] = max(0, last - sub.position)
        projections = {
            name: max(0, last - position)
            for name, position in kernel.describe().get("projections", {}).items()
        }
        return Sample(last, {"subscribers": subscribers, "projections": projections})

    # -- health --------------------------------------------------------------------------

    async def _store_health(self) -> tuple[bool, dict[str, Any]]:
        t = self.append_timer
        p50, p99 = t.quantile(0.5), t.quantile(0.99)
        details: dict[str, Any] = {
            "writable": t.last_error is None,
            "appends": t.histogram.count,
            "append_p50_ms": None if p50 is None else p50 * 1000,
            "append_p99_ms": None if p99 is None else p99 * 1000,
        }
        if t.last_error is not None:
            details["error"] = f"the last append failed: {t.last_error}"
        return t.last_error is None, details

    async def _plugins_health(self) -> tuple[bool, dict[str, Any]]:
        # A plugin that failed to load degrades the node but does not fail it: a 503 would
        # take every other plugin out of a load balancer with it.
        c = self.counters
        return True, {
            "loaded": sorted(c.loaded),
            "failed": dict(sorted(c.failed.items())),
            "degraded": bool(c.failed),
        }

    async def _subscribers_health(self) -> tuple[bool, dict[str, Any]]:
        sample = await self.sample()
        bound = next(
            (r.bound for r in self.settings.alerts.rules if r.kind == "subscriber_lag"), 10_000
        )
        stopped = [
            sub.name
            for sub in getattr(self.kernel, "_subscriptions", ())
            if not getattr(sub, "running", True)
        ]
        lagging = {n: lag for n, lag in sample.lags["subscribers"].items() if lag > bound}
        details: dict[str, Any] = {"lag": sample.lags["subscribers"], "bound": bound}
        if stopped:
            details["stopped"] = stopped
        if lagging:
            details["lagging"] = lagging
        return not stopped and not lagging, details

    async def _logs_health(self) -> tuple[bool, dict[str, Any]]:
        d = self.logs.describe()
        return d["failing"] is None, {k: d[k] for k in ("stored", "dropped", "failing")}

    # -- notifications -------------------------------------------------------------------

    def _notify(self, record: Recorded) -> None:
        for hook in self.webhooks:
            hook.offer(record)
