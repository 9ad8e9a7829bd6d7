"""The counters projection: sandbox events counted by name, snapshots restore the same state."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import orjson
import pytest

from kernel import Kernel, Settings
from kernel.events import Event
from services.loader.events import PluginLoaded, PluginLoadFailed, PluginUnloaded
from services.monitor.projection import AlertBook, Counters
from services.monitor.service import MonitorService
from services.sandbox.events import SandboxCircuitOpened
from services.scheduler.events import TaskStarted

pytestmark = pytest.mark.anyio


class SandboxFutureEvent(Event):  # a Sandbox* type the monitor has never heard of
    plugin: str


async def test_counters_fold_and_survive_a_snapshot(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, node="n", reload=False, store="memory")
    async with Kernel(settings, services=[MonitorService()]) as k:
        await k.append(
            PluginLoaded(
                name="p", version="1", generation=1, mode="trusted", prefix=None,
                routes=[], tasks=[], digest="d", duration_ms=1.0,
            ),
            stream="plugin-p",
        )  # fmt: skip
        await k.append(PluginUnloaded(name="p", generation=1), stream="plugin-p")
        await k.append(PluginLoadFailed(name="q", stage="import", error="boom"), stream="plugin-q")
        await k.append(
            SandboxCircuitOpened(
                plugin="s", generation=1, crashes=5, window_s=60, reason="crashes"
            ),
            stream="sandbox-s",
        )
        await k.append(SandboxFutureEvent(plugin="s"), stream="sandbox-s")
        await k.append(
            TaskStarted(task="p.t", run_id="r", scheduled_for=time.time() - 2), stream="task-p.t"
        )
        await k.settle()
        c = k.projection(Counters)
        assert c.sandbox == {"s\tSandboxCircuitOpened": 1}
        assert c.loaded == {} and set(c.failed) == {"q"}
        assert c.plugins["p"]["loads"] == 1 and c.plugins["p"]["unloads"] == 1
        assert c.tasks["p.t"].lateness.count == 1 and c.tasks["p.t"].lateness.sum >= 1.9
        # the sandbox circuit rule raised an alert, by the event's name
        await _open_becomes(k, {"plugin-load-failed:q", "sandbox-circuit:s"})
        # the circuit closes when the plugin is loaded again
        await k.append(
            PluginLoaded(
                name="s", version="1", generation=2, mode="sandboxed", prefix=None,
                routes=[], tasks=[], digest="d", duration_ms=1.0,
            ),
            stream="plugin-s",
        )  # fmt: skip
        await k.settle()
        await _open_becomes(k, {"plugin-load-failed:q"})
        restored = Counters()
        restored.restore(orjson.loads(orjson.dumps(c.snapshot())))
        assert restored.snapshot() == c.snapshot()
        book = AlertBook()
        book.restore(orjson.loads(orjson.dumps(k.projection(AlertBook).snapshot())))
        assert book.snapshot() == k.projection(AlertBook).snapshot()


async def _open_becomes(kernel: Kernel, keys: set[str]) -> None:
    with anyio.fail_after(30):
        while set(kernel.projection(AlertBook).open) != keys:
            await anyio.sleep(0.02)
