"""Garbage-collector pauses: the scheduler keeps what the boot built out of them.

Guarantee: once the kernel has booted and registered its schedules, a collection no
longer walks the objects built for them, so with 10,000 schedules no run waits behind
a ~90 ms full collection (measured: ``bench/scheduler.py``, docs/scheduler.md).

Mechanism: CPython's full (generation-2) collection traverses every tracked object;
with 10,000 schedules that is the tasks, triggers, entries and the projection's rows —
a stop-the-world pause each time, and every run due in it is late. When registrations
have been quiet for :attr:`GcPolicy.settle` seconds, the policy collects once and calls
``gc.freeze()``: the survivors move to the permanent generation, which collections
skip. It also raises the generation-0 threshold (fewer young collections; each is
still small). A later registration or unload — a plugin reloaded, whose old objects
may be frozen — first ``gc.unfreeze()``s, so the old generation can be collected at the
next settle: one pause at reload time instead of one every few seconds.

This is a process-wide choice made by the scheduler (setting ``manage_gc``, default
on): the application does not have to call ``gc.freeze()`` itself, and can turn it off.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time

__all__ = ["GcPolicy"]

log = logging.getLogger("xcore.scheduler")


class GcPolicy:
    #: Seconds without registration before the heap is frozen.
    settle = 1.0
    #: The generation-0 threshold while frozen (CPython's default is 700).
    young_threshold = 10_000

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._task: asyncio.Task[None] | None = None
        self._last_poke = 0.0
        self._saved: tuple[int, int, int] | None = None
        #: how many times the heap was frozen, and the last freeze's pause (ms)
        self.freezes = 0
        self.last_pause_ms: float | None = None

    def poke(self) -> None:
        """Registrations changed: thaw now, freeze again once they are quiet."""
        if not self.enabled:
            return
        self._last_poke = time.monotonic()
        if gc.get_freeze_count():
            gc.unfreeze()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._settle(), name="xcore-scheduler-gc"
            )

    async def _settle(self) -> None:
        # a deadline that moves with each poke (not an event to wait for)
        while (wait := self._last_poke + self.settle - time.monotonic()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(wait)
        t0 = time.perf_counter()
        gc.collect()
        gc.freeze()
        if self._saved is None:
            self._saved = gc.get_threshold()
            _, g1, g2 = self._saved
            gc.set_threshold(max(self.young_threshold, self._saved[0]), g1, g2)
        self.freezes += 1
        self.last_pause_ms = (time.perf_counter() - t0) * 1000
        log.debug(
            "scheduler: %d objects frozen out of the collector (%.1f ms)",
            gc.get_freeze_count(),
            self.last_pause_ms,
        )

    async def stop(self) -> None:
        """Give the collector back its defaults (the kernel may start again in-process)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._saved is not None:
            gc.set_threshold(*self._saved)
            self._saved = None
        if self.enabled and gc.get_freeze_count():
            gc.unfreeze()
