"""The supervisor of one sandboxed plugin generation: its worker, restarts, circuit, stats.

:meth:`SandboxedPlugin.run` lives in the sandbox service's task group for as long as the
generation is loaded. It starts the first worker (the loader waits for it: a failure is
the load's failure and no worker is left behind), then watches it: when the worker dies
without being asked, the breach or crash is recorded, and a new worker is started after
an exponential backoff (``SandboxRestarted``). After ``circuit_crashes`` crashes within
``circuit_window_s`` the circuit opens (``SandboxCircuitOpened``) and stays open until
the generation is replaced (an operator's reload or enable loads a new one).

While no worker serves (starting again, circuit open, stopping) every call fails at once
with :class:`Unavailable`, naming the plugin and the reason: never a hang.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from kernel.events import Event

from .bridge import Bridge
from .events import (
    SandboxCircuitOpened,
    SandboxCrashed,
    SandboxLimitExceeded,
    SandboxRestarted,
    SandboxStarted,
    SandboxStopped,
)
from .isolation import Launch
from .limits import Limits
from .reaper import Reaper
from .settings import SandboxSettings
from .worker_process import Exit, Worker, WorkerGone

__all__ = ["CallFailed", "SandboxedPlugin", "Unavailable"]

log = logging.getLogger("xcore.sandbox")

Record = Callable[[str, Event], Awaitable[None]]


class Unavailable(Exception):
    """The plugin has no worker serving right now (``reason`` says why)."""

    def __init__(self, plugin: str, reason: str) -> None:
        super().__init__(f"plugin {plugin!r} is unavailable: {reason}")
        self.plugin = plugin
        self.reason = reason


class CallFailed(Exception):
    """The plugin's code raised; the message is its exception (``Type: message``)."""

    def __init__(self, error: str, traceback: str = "") -> None:
        super().__init__(error)
        self.traceback = traceback


@dataclass
class Stats:
    calls: int = 0
    failures: int = 0
    cpu_ms_total: float = 0.0
    cpu_ms_last: float = 0.0
    cpu_ms_max: float = 0.0
    restarts: int = 0
    crashes_total: int = 0
    last_exit: dict[str, Any] | None = None
    by_kind: dict[str, int] = field(default_factory=dict)

    def observe(self, kind: str, ok: bool, cpu_ms: float) -> None:
        self.calls += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        if not ok:
            self.failures += 1
        self.cpu_ms_total += cpu_ms
        self.cpu_ms_last = cpu_ms
        self.cpu_ms_max = max(self.cpu_ms_max, cpu_ms)


class SandboxedPlugin:
    """One generation of a sandboxed plugin and the workers that serve it."""

    def __init__(
        self,
        *,
        name: str,
        generation: int,
        launch: Launch,
        config: dict[str, Any],
        limits: Limits,
        settings: SandboxSettings,
        record: Record,
        uid: int,
        bridge: Bridge | None = None,
        reaper: Reaper | None = None,
    ) -> None:
        self.name = name
        self.generation = generation
        self.launch = launch
        self.config = config
        self.limits = limits
        self.settings = settings
        self.uid = uid
        self.bridge = bridge
        self.reaper = reaper
        self._record = record
        #: starting | running | restarting | open | stopping | stopped | failed
        self.state = "starting"
        self.reason = "its worker is starting"
        self.worker: Worker | None = None
        self.ready: dict[str, Any] | None = None
        self.failure: dict[str, Any] | None = None
        self.stats = Stats()
        self.crashes: deque[float] = deque()
        self.started = anyio.Event()
        self._stop = anyio.Event()
        self._stopped = anyio.Event()
        self._stop_reason = ""

    # -- life ------------------------------------------------------------------------

    def _new_worker(self) -> Worker:
        s = self.settings
        return Worker(
            plugin=self.name,
            generation=self.generation,
            launch=self.launch,
            config=self.config,
            wall_time=self.limits.wall_time,
            heartbeat_interval=s.heartbeat_interval_s,
            heartbeat_timeout=s.heartbeat_timeout_s,
            start_timeout=s.start_timeout_s,
            limits=self.limits.as_dict(),
            bridge=self.bridge,
            cancel_grace=s.cancel_grace_s,
            reaper=self.reaper,
        )

    async def run(self) -> None:
        """Serve this generation until :meth:`stop` (runs in the service's task group)."""
        try:
            async with anyio.create_task_group() as tg:
                worker = self._new_worker()
                tg.start_soon(worker.run)
                await worker.ready_event.wait()
                if worker.ready is None:
                    await worker.exited.wait()
                    self.failure = worker.failure or {
                        "stage": "import",
                        "error": "the worker failed",
                    }
                    self.state = "failed"
                    self.started.set()
                    return
                self.ready = worker.ready
                await self._serving(worker, restart=None)
                self.started.set()
                await self._supervise(tg, worker)
        finally:
            self.state = "stopped" if self.state != "failed" else "failed"
            self.started.set()
            self._stopped.set()

    async def _serving(self, worker: Worker, restart: tuple[int, float] | None) -> None:
        self.worker = worker
        self.state, self.reason = "running", ""
        await self._record(
            self.name,
            SandboxStarted(
                plugin=self.name,
                generation=self.generation,
                pid=worker.pid,
                level=self.launch.level,
                limits=self.limits.as_dict(),
                uid=int(worker.ready.get("uid", -1)) if worker.ready else -1,
                network=self.limits.network,
                duration_ms=round(worker.start_ms, 3),
                process_limit=worker.process_limit,
            ),
        )
        if restart is not None:
            attempt, delay = restart
            self.stats.restarts += 1
            await self._record(
                self.name,
                SandboxRestarted(
                    plugin=self.name,
                    generation=self.generation,
                    pid=worker.pid,
                    attempt=attempt,
                    delay_s=delay,
                ),
            )

    async def _supervise(self, tg: Any, worker: Worker) -> None:
        attempt = 0
        while True:
            # wait for the worker to end, or for a stop request
            async with anyio.create_task_group() as wait:

                async def on_stop() -> None:
                    await self._stop.wait()
                    wait.cancel_scope.cancel()

                async def on_exit(w: Worker = worker) -> None:
                    await w.exited.wait()
                    wait.cancel_scope.cancel()

                wait.start_soon(on_stop)
                wait.start_soon(on_exit)
            if self._stop.is_set():
                await self._shutdown(worker)
                return
            assert worker.exit is not None
            await self._record_exit(worker.exit)
            now = time.monotonic()
            self.crashes.append(now)
            while self.crashes and now - self.crashes[0] > self.settings.circuit_window_s:
                self.crashes.popleft()
            if len(self.crashes) >= self.settings.circuit_crashes:
                self.state = "open"
                self.reason = (
                    f"its circuit is open after {len(self.crashes)} crashes in "
                    f"{self.settings.circuit_window_s:g}s (last: {worker.exit.describe()}); "
                    "reload or enable the plugin to try again"
                )
                log.error("sandbox: plugin %r: %s", self.name, self.reason)
                await self._record(
                    self.name,
                    SandboxCircuitOpened(
                        plugin=self.name,
                        generation=self.generation,
                        crashes=len(self.crashes),
                        window_s=self.settings.circuit_window_s,
                        reason=worker.exit.describe(),
                    ),
                )
                await self._stop.wait()
                return
            attempt += 1
            delay = min(
                self.settings.restart_backoff_s * 2 ** (len(self.crashes) - 1),
                self.settings.restart_backoff_max_s,
            )
            self.state = "restarting"
            self.reason = f"its worker is restarting after: {worker.exit.describe()}"
            with anyio.move_on_after(delay):
                await self._stop.wait()
            if self._stop.is_set():
                return
            worker = self._new_worker()
            tg.start_soon(worker.run)
            await worker.ready_event.wait()
            if worker.ready is None:
                await worker.exited.wait()
                error = (worker.failure or {}).get("error", "the worker failed")
                log.error("sandbox: plugin %r: a restarted worker failed: %s", self.name, error)
                continue
            await self._serving(worker, restart=(attempt, delay))

    async def _record_exit(self, exit: Exit) -> None:
        self.stats.crashes_total += 1
        self.stats.last_exit = {
            "kind": exit.kind,
            "pid": exit.pid,
            "exit": exit.exit,
            "signal": exit.signal,
            "limit": exit.limit,
            "value": exit.value,
            "detail": exit.detail,
            "at": time.time(),
        }
        if exit.kind == "limit" and exit.limit is not None:
            event: Event = SandboxLimitExceeded(
                plugin=self.name,
                generation=self.generation,
                pid=exit.pid,
                limit=exit.limit,
                value=exit.value,
                detail=exit.detail,
            )
        else:
            event = SandboxCrashed(
                plugin=self.name,
                generation=self.generation,
                pid=exit.pid,
                exit=exit.exit,
                signal=exit.signal,
                stderr=exit.stderr[-4000:],
                detail=exit.detail,
            )
        log.warning(
            "sandbox: plugin %r generation %d: %s", self.name, self.generation, exit.describe()
        )
        await self._record(self.name, event)

    async def _shutdown(self, worker: Worker) -> None:
        self.state = "stopping"
        self.reason = f"it is stopping ({self._stop_reason})"
        # new calls go to the next generation (or fail fast); those already sent finish
        # here, within the wall time they have anyway
        await worker.drain(self.limits.wall_time)
        if worker.alive and "on_unload" in (worker.ready or {}).get("hooks", ["on_unload"]):
            try:
                with anyio.move_on_after(self.settings.stop_grace_s):
                    await self.call({"op": "hook", "hook": "on_unload"}, kind="hook", worker=worker)
            except (WorkerGone, Unavailable, CallFailed) as exc:
                log.error("sandbox: plugin %r: on_unload failed: %s", self.name, exc)
        await worker.stop(self.settings.stop_grace_s)
        await self._record(
            self.name,
            SandboxStopped(
                plugin=self.name,
                generation=self.generation,
                pid=worker.pid,
                reason=self._stop_reason,
            ),
        )

    async def stop(self, reason: str) -> None:
        """Stop the worker (running ``on_unload`` first) and end :meth:`run`."""
        if not self._stop.is_set():
            self._stop_reason = reason
            self._stop.set()
        await self._stopped.wait()

    # -- calls -----------------------------------------------------------------------

    def serving(self) -> Worker:
        """The worker serving right now, or :class:`Unavailable` at once."""
        worker = self.worker
        if self.state != "running" or worker is None or not worker.alive:
            raise Unavailable(self.name, self.reason or "its worker is not running")
        return worker

    async def call(
        self, header: dict[str, Any], *, kind: str, worker: Worker | None = None
    ) -> dict[str, Any]:
        """One request/answer call (task run, hook, no-op); raises :class:`CallFailed`
        when the plugin's code raised, :class:`WorkerGone` when the worker died."""
        w = worker if worker is not None else self.serving()
        label = f"{kind} {header.get('task') or header.get('hook') or ''}".strip()
        h = await w.request(header, label=label, grace=self.settings.cancel_grace_s)
        ok = bool(h.get("ok"))
        self.stats.observe(kind, ok, float(h.get("cpu_ms", 0.0)))
        if not ok:
            raise CallFailed(str(h.get("error", "failed")), str(h.get("traceback", "")))
        return h

    def describe(self) -> dict[str, Any]:
        """Level, limits, state and stats (the admin API's view)."""
        w = self.worker
        return {
            "plugin": self.name,
            "generation": self.generation,
            "state": self.state,
            "reason": self.reason or None,
            "level": self.launch.level,
            "limits": self.limits.as_dict(),
            "pid": w.pid if w is not None else None,
            "uid": (w.ready or {}).get("uid") if w is not None else None,
            "process_limit": w.process_limit if w is not None else None,
            "started_at": w.started_at if w is not None else None,
            "start_ms": round(w.start_ms, 3) if w is not None else None,
            "rss_mb": round(w.rss / 2**20, 3) if w is not None else None,
            "rss_max_mb": round(w.rss_max / 2**20, 3) if w is not None else None,
            "cpu_s": round(w.cpu_s, 3) if w is not None else None,
            "calls_in_flight": w.in_flight if w is not None else 0,
            "recent_crashes": len(self.crashes),
            "stats": {
                "calls": self.stats.calls,
                "failures": self.stats.failures,
                "by_kind": dict(self.stats.by_kind),
                "cpu_ms_total": round(self.stats.cpu_ms_total, 3),
                "cpu_ms_last": round(self.stats.cpu_ms_last, 3),
                "cpu_ms_max": round(self.stats.cpu_ms_max, 3),
                "restarts": self.stats.restarts,
                "exits": self.stats.crashes_total,
                "last_exit": self.stats.last_exit,
            },
            "stderr_tail": list(w.stderr_tail)[-10:] if w is not None else [],
        }
