"""While a generation is built, the event loop keeps priority over the threads building it.

Guarantee: building a plugin generation — importing it and building its app and OpenAPI
in worker threads, 1-2 s of CPU for a plugin with 300 routes — slows the requests other
plugins serve meanwhile by a fraction of a millisecond per request, not by a multiple of
their latency; and a build no longer sets off the full collections of the cyclic garbage
collector that stopped every thread for 100-250 ms, one or two per reload.

Mechanism (both process-wide, held from the first build that starts to the last one
that ends, and put back then):

- *Interpreter hand-over.* One thread runs Python at a time. A thread that wants the
  interpreter back — the event loop, after each socket call of each request — waits
  until the running thread is asked to let go, ``sys.getswitchinterval()`` later
  (5 ms by default). With a build thread busy, every request paid several of those
  waits. During builds the interval is lowered to ``build_switch_interval_ms``
  (setting of ``services.loader``, 0.25 ms by default; 0 keeps the interpreter's).
- *Full collections deferred.* A full (generation-2) collection walks every tracked
  object while holding the interpreter, and the objects a build allocates (thousands of
  routes, fields, schemas) trigger them. While a build runs none starts: the window
  brackets it with :data:`kernel.collector.collector` (``build_started`` /
  ``build_ended``), the process's one owner of the garbage collector, which frees the
  unloaded generations' garbage once the builds have settled, in one collection that
  walks only the objects allocated since the boot (kernel/collector.py). Setting
  ``defer_full_gc: false`` turns this off (the loader then leaves the collector to the
  interpreter: no boot layer is frozen).
- *Paced build threads.* A build thread that never waits slices every request of the
  loop into switch-interval pieces. While the window is open, threads building routes
  compute at most ``build_cpu_share`` of the wall time (0.3 by default; 1 turns it off):
  they pause between routes (kernel/pacing.py), and wait up to ``build_yield_ms`` per
  route while plugin requests are in flight (requests first) — with ``build_fine_yield``
  (the default) or ``build_watch_loop``, while the event loop has any work, uvicorn
  reading or writing a socket too (the loader watches its selector, kernel/pacing.py
  ``watch_loop``); with ``build_fine_yield`` they also look between every two function
  calls of a unit (a profile function in the build thread) and give way at once. Long
  plugin files are parsed and compiled in pieces with the same pauses between
  (services/loader/source.py).
- *Young collections between units.* While a paced window is open (and ``defer_full_gc``),
  the young generation's threshold is raised and the build threads run the young
  passes themselves at their next pause (kernel/collector.py ``young_paced``), so the
  event loop's thread no longer walks the build's survivors in the middle of a request.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator

from kernel import pacing
from kernel.collector import MAX_DEFERRED, SENTINEL, collector

__all__ = ["MAX_DEFERRED", "SENTINEL", "BuildWindow", "building", "window"]


class BuildWindow:
    """Process-wide state of the builds in progress (one instance: :data:`window`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: Builds in progress.
        self.active = 0
        self._saved_interval: float | None = None
        self._set_interval: float | None = None
        #: This window raised the young threshold (kernel/collector.py young_paced).
        self._young = False

    @property
    def unloaded_since_full(self) -> int:
        """Generations unloaded since the last full collection (from any source)."""
        return collector.unloaded_since_full

    @property
    def forced(self) -> int:
        """Full collections run at the end of a build (without a collector owner)."""
        return collector.forced

    def enter(
        self,
        switch_interval: float | None,
        defer_full_gc: bool,
        cpu_share: float = 1.0,
        yield_s: float = 0.0,
        fine: bool = False,
    ) -> None:
        with self._lock:
            self.active += 1
            if self.active == 1 and cpu_share < 1.0:
                pacing.set_share(cpu_share, yield_s, fine)
                self._young = defer_full_gc
                if defer_full_gc:
                    collector.young_paced(True)
            if switch_interval is not None and switch_interval > 0:
                current = sys.getswitchinterval()
                if self._saved_interval is None:
                    self._saved_interval = current
                if switch_interval < current:
                    sys.setswitchinterval(switch_interval)
                    self._set_interval = sys.getswitchinterval()
        collector.build_started(defer_full_gc)

    def exit(self, defer_full_gc: bool) -> None:
        with self._lock:
            self.active -= 1
            if self.active == 0:
                pacing.set_share(1.0)
                if self._young:
                    self._young = False
                    collector.young_paced(False)
            if self.active == 0 and self._saved_interval is not None:
                # put back only what this module set (another change is kept)
                if self._set_interval is None or sys.getswitchinterval() == self._set_interval:
                    sys.setswitchinterval(self._saved_interval)
                self._saved_interval = None
                self._set_interval = None
        collector.build_ended(defer_full_gc)

    def note_unloaded(self) -> None:
        """A generation was unloaded: its objects are garbage for a full collection."""
        collector.note_unloaded()


#: The one window of this process (the switch interval and the collector are global).
window = BuildWindow()


@contextlib.contextmanager
def building(
    switch_interval_ms: float = 0.25,
    defer_full_gc: bool = True,
    cpu_share: float = 1.0,
    yield_ms: float = 0.0,
    fine_yield: bool = False,
) -> Iterator[None]:
    """Hold the build window while the block runs (nests; threads may share it)."""
    # (below 10 us the interpreter would do little but switch threads)
    interval = max(switch_interval_ms, 0.01) / 1000 if switch_interval_ms > 0 else None
    window.enter(interval, defer_full_gc, cpu_share, yield_ms / 1000, fine_yield)
    try:
        yield
    finally:
        window.exit(defer_full_gc)
