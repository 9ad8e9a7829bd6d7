"""Garbage-collector pauses: the scheduler keeps what the boot built out of them.

Guarantee: once the kernel has booted and registered its schedules, a collection no
longer walks the objects built for them, so with 10,000 schedules no run waits behind
a ~90 ms full collection (measured: ``bench/scheduler.py``, docs/scheduler.md).

Mechanism: CPython's full (generation-2) collection traverses every tracked object;
with 10,000 schedules that is the tasks, triggers, entries and the projection's rows —
a stop-the-world pause each time, and every run due in it is late. When registrations
have been quiet for :attr:`GcPolicy.settle` seconds, the policy calls ``gc.freeze()``
(in a gap of at least 50 ms before the next due time): every tracked object moves to
the permanent generation, which collections skip. Freezing is a constant-time list
splice — no collection first, which would be the very pause this avoids; the boot's
own cyclic garbage is frozen along (a bounded, one-time cost in memory). It also
raises the generation-0 threshold (fewer young collections; each is still small). A
later registration that may free objects (a plugin registered again) or an unload
first ``gc.unfreeze()``s; the next settle then collects before it freezes again, so an
old generation's objects are freed, not frozen for good: one pause at reload time
instead of one every few seconds. A plugin's first registration thaws nothing: with
10,000 schedules registered plugin by plugin, a settle between two of them made the
next settle collect the whole heap (1.9 s measured on a loaded machine, among the
first bursts). Its settle collects the young generations only — objects made lately,
its own and its garbage, none frozen — before freezing them: its cyclic garbage is not
frozen for good (100 plugins, each leaving 3.6 MB of garbage at its import, held
415 MB instead of 60 MB when it was).

While frozen, the young collections are the policy's too: a tick (every
:attr:`GcPolicy.tick` seconds) collects the young generation early and small (once
:attr:`GcPolicy.young_batch` allocations are pending: a pause of a few ms), and never in
a *start window* (``Dispatcher.quiet_for``: from a timer's firing to the release of its
runs at their instant, or within :attr:`GcPolicy.young_gap` of the next firing): it runs
after a burst has started. While idle (fewer than :attr:`GcPolicy.young_batch`
allocations per :attr:`GcPolicy.idle_tick`, no start window near), the tick sleeps
:attr:`GcPolicy.idle_tick` instead (an idle server measured 1.8-2.1 % of a core with the
10 ms tick, 0.5 % so, 0.35 % without the policy), CPython's own generation-0 threshold
lowered to :attr:`GcPolicy.young_batch` meanwhile. The older generations are collected
by CPython's rule (same thresholds), only in a gap of at least :attr:`GcPolicy.gap`
before the next due time — a burst of runs due at one instant never waits behind a
generation-1 pause (20-100 ms with 10,000 schedules), nor behind CPython's own young
pass at its raised threshold (10-35 ms measured mid-burst). CPython's automatic
collection stays on, its generation-0 threshold raised to :attr:`GcPolicy.overdue` times
the tended one: a collection that far overdue runs at once, gap or not — even while code
holds the event loop (a plugin that never awaits) and no tick can run —, so memory stays
bounded whatever the schedules and the plugins. An application that turned collection
off (``gc.disable()``) keeps it off: the tick collects only while ``gc.isenabled()``,
and a settle that finds it off neither collects nor freezes (the application's own
``gc.collect()`` calls must still reach everything).

This is a process-wide choice made by the scheduler (setting ``manage_gc``, default
on): the application does not have to call ``gc.freeze()`` itself, and can turn it off.

When the process's collector has an owner (``kernel/collector.py``: the loader froze
what the boot built and runs full collections itself, in gaps), this policy defers to
it: it neither freezes nor thaws (freezing would put plugin generations out of reach of
every collection; thawing would make the next one walk the whole heap), and only tells
the collector when the scheduler's next timer leaves no gap for a pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable

from kernel.collector import collector

__all__ = ["GcPolicy"]

log = logging.getLogger("xcore.scheduler")


class GcPolicy:
    #: Seconds without registration before the heap is frozen.
    settle = 1.0
    #: The generation-0 threshold while frozen (CPython's default is 700).
    young_threshold = 10_000

    #: The freeze waits for a gap of at least this long before the next timer (s)...
    gap = 0.05
    #: ...for at most this long (then it freezes anyway).
    max_wait = 10.0
    #: While frozen, how often (s) the policy looks whether a collection is due...
    tick = 0.01
    #: ...a young collection runs once this many allocations are pending (few, so each
    #: pause is short: 4-8 ms median loaded, against 12-40 ms for CPython's pass at its
    #: raised threshold, 40,000 allocations)...
    young_batch = 5_000
    #: ...when no start window opens within this long (s; see ``Dispatcher.quiet_for``)
    young_gap = 0.01
    #: ...and how many thresholds' worth of allocations make it collect, gap or not.
    overdue = 4
    #: While idle (fewer than :attr:`young_batch` allocations in this long, and no start
    #: window opening within it), the tick sleeps this long (s) instead of :attr:`tick`,
    #: and CPython's own generation-0 threshold is :attr:`young_batch` meanwhile: an
    #: idle server does not wake 100 times a second (1.5 % of a core measured), and
    #: allocations that start while it sleeps are collected in passes as small as the
    #: tick's. 0: never idle.
    idle_tick = 0.25

    def __init__(
        self,
        enabled: bool = True,
        next_due: Callable[[], float | None] = lambda: None,
        quiet_for: Callable[[], float] = lambda: float("inf"),
    ) -> None:
        self.enabled = enabled
        #: when the scheduler's next timer fires (UTC epoch seconds), None if none
        self._next_due = next_due
        #: seconds until the next start window opens (0: one is open)
        self._quiet_for = quiet_for
        self._task: asyncio.Task[None] | None = None
        self._last_poke = 0.0
        self._saved: tuple[int, int, int] | None = None
        self._thawed = False
        #: a registration since the last freeze that thawed nothing: the settle collects
        #: the young generations (new objects only) before it freezes again
        self._fresh = False
        #: the heap is frozen by this policy (not thawed since)
        self._frozen = False
        self._tender: asyncio.Task[None] | None = None
        #: the generation-0 threshold the tick tends, while CPython's own is raised to
        #: ``overdue`` times it (None: not tending)
        self._young: int | None = None
        #: the tick sleeps :attr:`idle_tick` (CPython's threshold is then young_batch)
        self.idle = False
        #: (generation-0 count, monotonic time, young passes) at the last tick
        self._seen = (0, 0.0, 0)
        #: collections the policy ran itself, by generation
        self.collections = [0, 0, 0]
        #: how many times the heap was frozen, and the last freeze's pause (ms)
        self.freezes = 0
        self.last_pause_ms: float | None = None

    def poke(self, frees: bool = True) -> None:
        """Registrations changed: freeze again once they are quiet. ``frees``: objects
        frozen before may be garbage now (a plugin registered again or unregistered):
        thaw now, so the next settle collects them. A first registration of a plugin
        frees nothing: what is frozen stays frozen (no collection of the whole heap at
        the settle, a pause of seconds with 10,000 schedules on a loaded machine, which
        then landed among the first bursts); the settle collects the young generations
        (its own objects and garbage), then freezes them."""
        if not self.enabled:
            return
        collector.add_gap_check(self._gap)
        if collector.held:
            return  # the collector's owner decides (module docstring)
        self._last_poke = time.monotonic()
        self._automatic()  # registrations allocate: CPython collects as it likes
        if self._frozen and gc.get_freeze_count():
            if frees:
                gc.unfreeze()
                self._thawed = True
            else:
                # what came lately (this registration's objects and its garbage) is
                # collected at the settle, before it is frozen: the young generations
                # only, never the frozen heap
                self._fresh = True
        self._frozen = False
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._settle(), name="xcore-scheduler-gc"
            )

    async def _settle(self) -> None:
        # a deadline that moves with each poke (not an event to wait for)
        while (wait := self._last_poke + self.settle - time.monotonic()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(wait)
        # The collection below is one pause: put it between two due times, not on one.
        give_up = time.monotonic() + self.max_wait
        while time.monotonic() < give_up:
            due = self._next_due()
            if due is None or due - time.time() >= self.gap:
                break
            await asyncio.sleep(max(due - time.time(), 0) + 0.005)
        t0 = time.perf_counter()
        if collector.held:  # an owner came meanwhile: it decides
            return
        if not gc.isenabled():
            # the application turned collection off: it collects when it chooses (or
            # never). No pause of ours, and nothing frozen out of its own gc.collect()
            # (a thawed generation's garbage would stay frozen for good)
            log.debug("scheduler: gc disabled by the application; nothing frozen")
            return
        # No collection first: it would be the very pause this avoids (~90 ms with
        # 10,000 schedules). The boot's own cyclic garbage is frozen with the rest — a
        # bounded, one-time cost in memory — and collected after the next unfreeze.
        if self._thawed or self._fresh:
            # thawed: objects of an unloaded generation may be among them (a full
            # collection). Fresh: the young generations only, what was made lately and
            # not frozen (a first registration's garbage, frozen for good otherwise:
            # every new plugin's import garbage kept until a reload or an unload,
            # without bound); 26 ms after 9,900 schedules registered in a row, 1 ms
            # after a plugin of 100 (62 ms for a full one of what is not frozen)
            gc.collect(2 if self._thawed else 1)
            self._thawed = self._fresh = False
        gc.freeze()
        self._frozen = True
        if self._saved is None:
            self._saved = gc.get_threshold()
            _, g1, g2 = self._saved
            gc.set_threshold(max(self.young_threshold, self._saved[0]), g1, g2)
        self.freezes += 1
        self.last_pause_ms = (time.perf_counter() - t0) * 1000
        if self._young is None:
            t0, t1, t2 = gc.get_threshold()
            self._young = t0
            gc.set_threshold(t0 * self.overdue, t1, t2)
            self._tender = asyncio.get_running_loop().create_task(
                self._tend(), name="xcore-scheduler-gc-tend"
            )
            self._tender.add_done_callback(self._tend_ended)
        log.debug(
            "scheduler: %d objects frozen out of the collector (%.1f ms)",
            gc.get_freeze_count(),
            self.last_pause_ms,
        )

    def _automatic(self) -> None:
        """Give collection back to CPython (stop tending)."""
        tender, self._tender = self._tender, None
        if tender is not None:
            tender.cancel()
        self._untend()

    def _untend(self) -> None:
        """CPython's own generation-0 threshold back to the tended one."""
        young, self._young = self._young, None
        self.idle = False
        if young is not None:
            _, t1, t2 = gc.get_threshold()
            gc.set_threshold(young, t1, t2)

    def _tend_ended(self, task: asyncio.Task[None]) -> None:
        """A tick that failed must not leave the process without collections."""
        if task.cancelled() or (exc := task.exception()) is None:
            return
        log.error("scheduler: the GC tick failed; CPython collects again", exc_info=exc)
        if self._tender is task:
            self._tender = None
            self._untend()

    async def _tend(self) -> None:
        """Run the collections CPython would run, between due times (module docstring)."""
        self._seen = (gc.get_count()[0], time.monotonic(), gc.get_stats()[0]["collections"])
        while True:
            await asyncio.sleep(self._pace())
            self.tend_once()

    def _pace(self) -> float:
        """How long the tick sleeps next: :attr:`tick`, or :attr:`idle_tick` while few
        allocations are made and no start window is near (CPython's generation-0
        threshold then :attr:`young_batch`, so a burst of allocations meanwhile is
        collected in passes as small, before the tick wakes)."""
        young = self._young
        if young is None:
            return self.tick
        c0, now = gc.get_count()[0], time.monotonic()
        passes = gc.get_stats()[0]["collections"]
        last, at, passes_then = self._seen
        self._seen = (c0, now, passes)
        # allocations since the last tick, young passes meanwhile counted at their
        # threshold's worth (CPython's while idle, the policy's own otherwise)
        grown = max(0, c0 - last + (passes - passes_then) * gc.get_threshold()[0])
        # no start window may open while it sleeps (its tick runs after the burst), nor
        # within an older pass's length of its end (CPython's, at its threshold: it may
        # collect generation 1 too, not knowing of gaps)
        quiet = self._quiet_for() - max(self.young_gap, 2 * self.gap)
        idle = (
            self.idle_tick > self.tick
            and grown * self.idle_tick < self.young_batch * max(now - at, self.tick)
            and quiet > self.tick
        )
        if idle != self.idle:
            self.idle = idle
            _, t1, t2 = gc.get_threshold()
            gc.set_threshold(min(self.young_batch, young) if idle else young * self.overdue, t1, t2)
        return min(self.idle_tick, quiet) if idle else self.tick

    def tend_once(self) -> int | None:
        """One tick: the generation collected, or None (nothing due, or no gap)."""
        c0, c1, c2 = gc.get_count()
        _, t1, t2 = gc.get_threshold()
        t0 = self._young or 0
        if t0 <= 0 or c0 < min(t0, self.young_batch) or not gc.isenabled():
            return None  # (collection turned off by the application: its choice)
        if self._quiet_for() < self.young_gap:
            return None  # a burst is being started, or about to be: after it
        # a young generation kept small is a short pause, fine in any gap outside a
        # start window; an older one (its survivors too) waits for a long gap
        older = 2 if (c1 >= t1 and c2 >= t2) else 1 if c1 >= t1 else 0
        generation = older if older and self._gap() else 0
        gc.collect(generation)
        self.collections[generation] += 1
        return generation

    def _gap(self) -> bool:
        """True when a collection's pause now would not make a run late: no start window
        is open (a burst claimed, waiting for its instant: the next due time is then
        the burst after it) and the next burst's way begins :attr:`gap` from now or
        later. (Also the collector's gap check, for its full collections.)"""
        if self._quiet_for() <= 0:
            return False
        due = self._next_due()
        return due is None or due - time.time() >= self.gap

    async def stop(self) -> None:
        """Give the collector back its defaults (the kernel may start again in-process)."""
        collector.remove_gap_check(self._gap)
        self._automatic()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._saved is not None:
            # only the generation-0 threshold is the policy's: the others may be the
            # collector owner's meanwhile (its generation-2 threshold out of reach)
            _, t1, t2 = gc.get_threshold()
            gc.set_threshold(self._saved[0], t1, t2)
            self._saved = None
        # what the policy froze is thawed; an owner's boot layer (an owner that came
        # after the freeze holds it too) is the owner's, thawed when it releases
        if self._frozen and not collector.held and gc.get_freeze_count():
            gc.unfreeze()
        self._frozen = False
