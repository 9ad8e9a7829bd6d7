"""The one owner of the cyclic garbage collector: plugin reloads never pay for the whole heap.

Guarantee: once the loader has booted, no collection walks the objects built before the
first plugin was imported (the kernel, its services, FastAPI, pydantic: ~90,000 objects,
~150 ms a full collection), no full collection runs while a generation is built, and the
garbage of unloaded generations is freed by one collection of the objects allocated
since the boot, run off the builds, once the reloads have settled and in a gap of the
scheduler's timers. Memory stays bounded: nothing a plugin generation allocates is ever
frozen, so every collection can free it.

Mechanism (process-wide: the collector is global):

- *Boot layer.* :meth:`Collector.acquire`, called by the loader right before it imports
  the first plugin at boot, moves every tracked object into the permanent generation
  (``gc.freeze()``, a constant-time list splice; no collection first). That layer is
  never thawed while an owner holds the collector, so later collections skip it;
  plugin generations are allocated afterwards and stay collectable.
- *Full collections are ours.* While held, the generation-2 threshold is out of reach
  (:data:`SENTINEL`); young collections go on (they are short). The collector runs
  ``gc.collect(2)`` itself, from a task of the owner's event loop (checked every
  :attr:`Collector.tick` seconds), when (a) a generation was unloaded
  (:meth:`note_unloaded`) and not freed by refcounting, once no build has run for
  :attr:`Collector.settle` seconds; (b) generations were unloaded and freed by
  refcounting (:meth:`note_freed`: the router took their apps apart,
  services/router/dismantle.py), whose small remains — module dicts, functions,
  classes — wait :attr:`Collector.remains_delay` seconds without a build, or until
  :data:`MAX_FREED` of them add up: a burst of reloads no longer sets off a collection
  that walks every live object (30-60 ms) right behind it; or (c) the interpreter would
  have run one: ``gc.get_count()[2]`` (young-generation collections since the last full
  one) reached the saved threshold and the heap grew by a quarter since our last
  collection (allocated blocks, not within ``settle`` of a build). All wait, at most
  :attr:`Collector.max_wait` seconds, for no build to be active and every registered gap
  check (:meth:`add_gap_check`: the scheduler's next timer at least 50 ms away) to agree.
- *Builds.* :meth:`build_started` / :meth:`build_ended` bracket a build (the loader's
  build window): collections of ours wait for the last to end. Without an owner (a
  build outside a running kernel) the interpreter's policy is only deferred during the
  build, and one full collection runs itself once :data:`MAX_DEFERRED` generations were
  unloaded since the last; with an owner, reloads back to back that never leave its
  task a gap make the build that ends collect after :data:`MAX_DEFERRED_HELD` unloaded
  generations, or 2 x :data:`MAX_FREED` freed ones.
- *Plugins that play with gc.* While held, ``gc`` is the collector's: if a plugin (or
  anyone) disabled it, its task enables it again (logged; not during a projection fold,
  which pauses it on purpose, nor if it was disabled when acquired); if objects were
  frozen beyond the boot layer (a plugin's ``gc.freeze()``), they could never be freed:
  from then on its collections thaw everything, collect and freeze again (logged once;
  each then walks the whole heap, the price of that plugin).
- *Settled freeze.* A kernel without the loader's boot layer (the scheduler alone) may
  still freeze its settled heap (``services/scheduler/gcpolicy.py``); when an owner
  holds the collector, that policy defers to it (:attr:`Collector.held`).

:meth:`Collector.stats` is what ``/health`` shows (``loader.gc``): the collections the
collector ran, their pauses, and whether one is pending; a benchmark waits for
``pending`` to clear before it measures a quiet phase.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = [
    "MAX_DEFERRED",
    "MAX_DEFERRED_HELD",
    "MAX_FREED",
    "SENTINEL",
    "YOUNG_SPLIT",
    "Collector",
    "collector",
]

log = logging.getLogger("xcore.gc")

#: Generations that may be unloaded without a full collection before a build runs one
#: (only without an owner: with one, the collector's task collects).
MAX_DEFERRED = 4
#: With an owner, the unloaded generations after which the build that ends collects
#: anyway (reloads back to back leave the owner's task no gap).
MAX_DEFERRED_HELD = 2 * MAX_DEFERRED
#: Unloaded generations freed by refcounting (:meth:`Collector.note_freed`) whose small
#: remains (module dicts, functions, classes: reference cycles) wait for one collection.
MAX_FREED = 32
#: The generation-2 threshold while deferred or owned (out of reach; recognisable).
SENTINEL = 2_000_000_011
#: While paced builds run (:meth:`Collector.young_paced`), the young generation's
#: threshold is raised this many times: build threads run the young collections
#: themselves between two units of work (:meth:`Collector.young_due`, kernel/pacing.py).
YOUNG_SLACK = 8
#: A build thread's young pass is due once this fraction of the saved threshold is
#: pending (:meth:`Collector.young_due`). The count is net of frees: an older object
#: freed (a request's, which survived a pass while in flight) lowers it without leaving
#: the young list, so in a server under traffic the list held 3,000-10,000 objects at a
#: count of 700-1,100, and each pass held the interpreter 0.6-1.2 ms (p50). At a quarter
#: of the threshold: p50 0.14 ms, four times as many passes, the same CPU in all.
YOUNG_SPLIT = 4
#: The largest threshold ``gc.set_threshold`` takes (a C int).
_MAX_THRESHOLD = 2**31 - 1
_DEFAULT_THRESHOLD_2 = 10


class Collector:
    """Process-wide owner of ``gc`` (one instance: :data:`collector`)."""

    #: Seconds without a build before an unloaded generation's garbage is collected.
    settle = 0.5
    #: How often the owner's task looks for work (s).
    tick = 0.1
    #: A collection waits at most this long for a gap (then runs anyway).
    max_wait = 10.0
    #: Seconds without a build before the remains of generations freed by refcounting
    #: are collected (:meth:`note_freed`; sooner once :data:`MAX_FREED` add up).
    remains_delay = 10.0

    def __init__(self) -> None:
        self._lock = threading.RLock()
        #: Owners holding the collector (loaders of running kernels).
        self.owners = 0
        #: Builds in progress.
        self.active = 0
        #: Generations unloaded since the last full collection (of any source).
        self.unloaded_since_full = 0
        #: Of the generations unloaded since then, those freed by refcounting (their
        #: remains alone call for no collection before :data:`MAX_FREED`).
        self.freed_since_full = 0
        #: Unloaded generations still serving requests, (plugin, generation) -> since
        #: (monotonic s): no collection can free them yet (:meth:`note_draining`).
        self.draining: dict[tuple[str, int], float] = {}
        #: Full-collection count (``gc.get_stats()[2]``) when each of the last drained
        #: generations ended its last request: a leak check counts only later ones.
        self.drained_at: dict[tuple[str, int], int] = {}
        #: Full collections the collector ran itself.
        self.collections = 0
        #: Full collections run at the end of a build without an owner (MAX_DEFERRED).
        self.forced = 0
        #: Objects frozen in the boot layer.
        self.boot_frozen = 0
        self.last_pause_ms: float | None = None
        self.max_pause_ms = 0.0
        self.total_pause_ms = 0.0
        self.last_freed = 0
        self._last_build_end = 0.0
        self._deferring = 0
        self._saved_threshold_2: int | None = None
        self._full_seen = gc.get_stats()[2]["collections"]
        self._gap_checks: list[Callable[[], bool]] = []
        self._task: asyncio.Task[None] | None = None
        self._collecting = False
        self._owner_defers = False
        #: Memory blocks allocated after our last full collection (sys.getallocatedblocks).
        self._blocks = 0
        #: ``gc`` was enabled when the owner acquired it (then it stays enabled).
        self._enabled_at_acquire = True
        #: Someone else (a plugin) froze objects beyond the boot layer: our collections
        #: thaw, collect and freeze again from then on, so the frozen garbage is freed.
        self.foreign_freeze = False
        #: Times ``gc`` was found disabled by someone else and enabled again.
        self.reenabled = 0
        #: Paced builds holding the young threshold raised, its saved and raised values.
        self._young_holders = 0
        self._saved_t0: int | None = None
        self._raised_t0 = 0

    # -- owner -------------------------------------------------------------------------

    @property
    def held(self) -> bool:
        """An owner holds the collector: the boot layer is frozen, full collections are ours."""
        return self.owners > 0

    def acquire(self) -> None:
        """Freeze what exists as the boot layer and own full collections (from a loop)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            self.owners += 1
            if self.owners > 1:
                return
            gc.freeze()
            self.boot_frozen = gc.get_freeze_count()
            self._enabled_at_acquire = gc.isenabled()
            self.foreign_freeze = False
            self._defer()
            self._owner_defers = True
            self._full_seen = gc.get_stats()[2]["collections"]
            self._blocks = sys.getallocatedblocks()
            self._task = loop.create_task(self._run(), name="xcore-gc")
            self._task.add_done_callback(self._ended)
        log.debug("gc: %d boot objects frozen out of collections", self.boot_frozen)

    async def release(self) -> None:
        """The owner stops: thresholds back, boot layer thawed (the last owner only)."""
        with self._lock:
            self.owners -= 1
            if self.owners > 0:
                return
            task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with self._lock:
            if self._owner_defers:
                self._owner_defers = False
                self._undefer()
            gc.unfreeze()
            self.boot_frozen = 0

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        # never leave the interpreter without full collections: its own policy resumes
        log.error(
            "gc: the collector's task failed; the interpreter collects again",
            exc_info=task.exception(),
        )
        with self._lock:
            if self._task is task:
                self._task = None
            if self._owner_defers:
                self._owner_defers = False
                self._undefer()

    def add_gap_check(self, check: Callable[[], bool]) -> None:
        """``check()`` is True when a pause of ~100 ms now would hurt no one (idempotent)."""
        with self._lock:
            if check not in self._gap_checks:
                self._gap_checks.append(check)

    def remove_gap_check(self, check: Callable[[], bool]) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._gap_checks.remove(check)

    # -- builds and unloads ------------------------------------------------------------

    def build_started(self, defer: bool = True) -> None:
        with self._lock:
            self.active += 1
            if defer:
                self._defer()

    def build_ended(self, defer: bool = True) -> None:
        collect = False
        with self._lock:
            self.active -= 1
            self._last_build_end = time.monotonic()
            self._sync()
            if defer:
                self._undefer()
                # without an owner every MAX_DEFERRED unloads; with one, only when
                # reloads never leave it a gap (a tight loop): memory stays bounded
                bound = MAX_DEFERRED_HELD if self.held else MAX_DEFERRED
                collect = (
                    self.unloaded_since_full >= bound or self.freed_since_full >= 2 * MAX_FREED
                )
        if collect:
            with self._lock:
                self._collect() if self.held else gc.collect()
            with self._lock:
                self.forced += 1
                self._sync()

    def young_paced(self, on: bool) -> None:
        """Paced builds start (``on``) or end: while any runs, young collections wait
        for a build thread's next unit of work (:meth:`young_due`) instead of starting
        inside a unit, on whichever thread allocated the 700th object — often the event
        loop's, walking the build's survivors there (2-7 ms per generation-1 pass). The
        raised threshold (:data:`YOUNG_SLACK` times) bounds what a build that stops
        pacing leaves uncollected; a threshold changed meanwhile by someone else is kept."""
        with self._lock:
            if on:
                self._young_holders += 1
                t0, t1, t2 = gc.get_threshold()
                if self._young_holders == 1 and t0 > 0:
                    self._saved_t0, self._raised_t0 = t0, min(t0 * YOUNG_SLACK, _MAX_THRESHOLD)
                    gc.set_threshold(self._raised_t0, t1, t2)
                return
            self._young_holders = max(self._young_holders - 1, 0)
            if self._young_holders == 0 and self._saved_t0 is not None:
                t0, t1, t2 = gc.get_threshold()
                if t0 == self._raised_t0:
                    gc.set_threshold(self._saved_t0, t1, t2)
                self._saved_t0 = None

    def young_due(self) -> int | None:
        """The young generation a build thread should collect now, between two units of
        its work (None: none is due): generations 0 and 1 together once a
        :data:`YOUNG_SPLIT`-th of the saved threshold's worth of objects is pending
        (the young list may hold several times the count); none once someone else set
        the young threshold meanwhile (the interpreter then collects at theirs).

        Generation 1 every pass, not every ``threshold[1]`` passes as the interpreter
        does: a build's survivors would pile up in generation 1 for ten passes, and the
        tenth walked them all while holding the interpreter (2.4-6.7 ms measured, the
        event loop waiting behind it); collected each time they are one unit's worth.
        Six reloads of a 300-route plugin: the build thread's passes took 71-72 ms in all
        (p90 0.21-0.23 ms) against 109-131 ms (generation-1 p90 2.4-3.4 ms). What
        survives moves to generation 2 sooner, where the full collections the window
        defers (and the owner's one after it) find it."""
        saved = self._saved_t0
        if saved is None or not gc.isenabled():
            return None
        threshold = gc.get_threshold()
        if threshold[0] != self._raised_t0:
            return None  # set meanwhile by someone else (0: no automatic passes): theirs
        if gc.get_count()[0] < max(saved // YOUNG_SPLIT, 1):
            return None
        return 1

    def note_unloaded(self) -> None:
        """A generation was unloaded: its objects are garbage for a full collection."""
        with self._lock:
            self._sync()
            self.unloaded_since_full += 1

    def note_freed(self, key: tuple[str, int] | None = None) -> None:
        """An unloaded generation's bulk was freed by refcounting (services/router/
        dismantle.py): what it left for a collection is small, so it no longer calls for
        one of its own; :data:`MAX_FREED` of them do. ``key``: it was draining."""
        with self._lock:
            self._sync()
            if key is not None and self._drained(key):
                self.freed_since_full += 1
            elif self.unloaded_since_full > 0:
                self.unloaded_since_full -= 1
                self.freed_since_full += 1

    def note_draining(self, key: tuple[str, int]) -> None:
        """Unloaded generation ``key`` (plugin, generation) still serves requests (a
        stream, a long poll, a websocket): a collection now could not free it, so its
        unload calls for none until it ends (:meth:`note_freed` or :meth:`note_kept`
        with the same key); a leak check meanwhile must not count it
        (:meth:`collections_since_drained`)."""
        with self._lock:
            self._sync()
            if key in self.draining:
                return
            if self.unloaded_since_full > 0:
                self.unloaded_since_full -= 1
            self.draining[key] = time.monotonic()

    def note_kept(self, key: tuple[str, int]) -> None:
        """Draining generation ``key`` ended its last request but something still holds
        its routes: it calls for a full collection, as an unload does."""
        with self._lock:
            self._sync()
            if self._drained(key):
                self.unloaded_since_full += 1

    def _drained(self, key: tuple[str, int]) -> bool:
        if self.draining.pop(key, None) is None:
            return False
        self.drained_at[key] = gc.get_stats()[2]["collections"]
        while len(self.drained_at) > 256:  # (the leak checks look at recent ones)
            del self.drained_at[next(iter(self.drained_at))]
        return True

    def full_since(self, key: tuple[str, int], at: int) -> bool:
        """Whether a full collection ran since count ``at`` while generation ``key`` was
        not serving requests (one that ran while it drained could not free it)."""
        with self._lock:
            if key in self.draining:
                return False
            full: int = gc.get_stats()[2]["collections"]
            return full > max(at, self.drained_at.get(key, at))

    # -- state -------------------------------------------------------------------------

    def pending(self) -> bool:
        """A collection of ours is due (or running)."""
        with self._lock:
            self._sync()
            # (the remains of freed generations wait for their delay: still pending)
            due = self._due() is not None or self.freed_since_full > 0
            return self.held and (self._collecting or due)

    def stats(self) -> dict[str, Any]:
        counts = gc.get_count()
        return {
            "owned": self.held,
            "boot_frozen": self.boot_frozen,
            "frozen": gc.get_freeze_count(),
            "pending": self.pending(),
            "unloaded_since_full": self.unloaded_since_full,
            "freed_since_full": self.freed_since_full,
            "draining": len(self.draining),
            "collections": self.collections,
            "full_collections": gc.get_stats()[2]["collections"],
            "young_collections": gc.get_stats()[0]["collections"]
            + gc.get_stats()[1]["collections"],
            "last_pause_ms": self.last_pause_ms,
            "max_pause_ms": round(self.max_pause_ms, 3),
            "total_pause_ms": round(self.total_pause_ms, 3),
            "last_freed": self.last_freed,
            "count": list(counts),
            "foreign_freeze": self.foreign_freeze,
            "reenabled": self.reenabled,
        }

    # -- internals ---------------------------------------------------------------------

    def _defer(self) -> None:
        self._deferring += 1
        if self._deferring == 1:
            t0, t1, t2 = gc.get_threshold()
            # a stale SENTINEL (someone saved and restored ours): the default
            self._saved_threshold_2 = _DEFAULT_THRESHOLD_2 if t2 == SENTINEL else t2
            gc.set_threshold(t0, t1, SENTINEL)

    def _undefer(self) -> None:
        self._deferring -= 1
        if self._deferring == 0 and self._saved_threshold_2 is not None:
            t0, t1, t2 = gc.get_threshold()
            if t2 == SENTINEL:  # another component's change is kept
                gc.set_threshold(t0, t1, self._saved_threshold_2)
            self._saved_threshold_2 = None

    def _sync(self) -> None:
        # full collections of any source restart the count (not a gc callback: Python
        # code run inside a collection lets threads switch in the middle of compile()
        # of an AST, whose depth counter CPython 3.11 shares between threads)
        full = gc.get_stats()[2]["collections"]
        if full != self._full_seen:
            self._full_seen = full
            self.unloaded_since_full = 0
            self.freed_since_full = 0

    def _due(self) -> str | None:
        if self.unloaded_since_full:
            return "unloaded generations"
        if self.freed_since_full and (
            self.freed_since_full >= MAX_FREED
            or time.monotonic() - self._last_build_end >= self.remains_delay
        ):
            return "remains of freed generations"
        threshold = self._saved_threshold_2 or _DEFAULT_THRESHOLD_2
        if gc.get_count()[2] >= threshold:
            # the interpreter's own rule: only once what survived young collections
            # since the last full one grew the heap by more than a quarter, in allocated
            # blocks (constant time; counting the old objects, gc.get_objects(2), held the
            # loop 10-20 ms), and not within ``settle`` of a build: during a reload the
            # heap holds both generations, the new one and the one about to be unloaded
            # and freed by refcounting (services/router/dismantle.py)
            if time.monotonic() < self._last_build_end + self.settle:
                return None
            if sys.getallocatedblocks() - self._blocks > self._blocks // 4:
                return "young collections"
        return None

    def _gap(self) -> bool:
        if self.active:
            return False
        if self.unloaded_since_full and time.monotonic() - self._last_build_end < self.settle:
            return False
        for check in list(self._gap_checks):
            try:
                if not check():
                    return False
            except Exception:
                log.exception("gc: a gap check failed; ignored")
        return True

    def _police(self) -> None:
        """Undo what a plugin's ``gc.disable()`` did (while held, ``gc`` is ours)."""
        if gc.isenabled() or not self._enabled_at_acquire:
            return
        from kernel.projections import folding  # (a fold pauses it on purpose)

        if folding():
            return
        gc.enable()
        self.reenabled += 1
        log.warning(
            "gc: the garbage collector was found disabled (gc.disable(), by a plugin?); "
            "enabled again: while the loader owns it, cyclic garbage must stay collectable"
        )

    def _thaw_foreign(self) -> bool:
        """True if objects were frozen beyond the boot layer (by someone else)."""
        if self.foreign_freeze:
            return True
        if gc.get_freeze_count() > self.boot_frozen:
            self.foreign_freeze = True
            log.warning(
                "gc: %d objects were frozen beyond the boot layer (gc.freeze(), by a "
                "plugin?): they could never be freed; full collections now thaw, collect "
                "and freeze again (each walks the whole heap)",
                gc.get_freeze_count() - self.boot_frozen,
            )
        return self.foreign_freeze

    def _collect(self) -> int:
        if not self._thaw_foreign():
            return gc.collect(2)
        gc.unfreeze()
        freed = gc.collect(2)
        gc.freeze()
        self.boot_frozen = gc.get_freeze_count()
        return freed

    async def _run(self) -> None:
        waiting_since: float | None = None
        while True:
            await asyncio.sleep(self.tick)
            with self._lock:
                self._police()
                self._sync()
                why = self._due()
                if why is None:
                    waiting_since = None
                    continue
                now = time.monotonic()
                if waiting_since is None:
                    waiting_since = now
                if self.active or (not self._gap() and now - waiting_since < self.max_wait):
                    continue
                self._collecting = True
            try:
                start = time.perf_counter()
                freed = self._collect()
                pause = (time.perf_counter() - start) * 1000
            finally:
                with self._lock:
                    self._collecting = False
                    self._sync()
            waiting_since = None
            with self._lock:
                self._blocks = sys.getallocatedblocks()
                self.collections += 1
                self.last_pause_ms = round(pause, 3)
                self.max_pause_ms = max(self.max_pause_ms, pause)
                self.total_pause_ms += pause
                self.last_freed = freed
            log.debug("gc: full collection (%s): %d freed in %.1f ms", why, freed, pause)


#: The one collector of this process (the garbage collector is global).
collector = Collector()
