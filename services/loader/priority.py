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
  routes, fields, schemas) trigger them. During builds the generation-2 threshold is
  raised out of reach (young collections go on: they are short). The garbage of
  replaced generations is only freed by a full collection, so memory stays bounded: once
  :data:`MAX_DEFERRED` generations were unloaded (:meth:`BuildWindow.note_unloaded`)
  since the last full collection, the build that ends runs one itself (one pause every
  few reloads instead of one or two per reload; none at boot, where nothing is
  replaced and the interpreter's own policy resumes after the last build). Setting
  ``defer_full_gc: false`` turns this off.

The generation-2 threshold is set to :data:`SENTINEL` and put back only if it still holds
it, so a component changing the other thresholds meanwhile (the scheduler's GC policy)
keeps its change.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import threading
from collections.abc import Iterator

__all__ = ["MAX_DEFERRED", "SENTINEL", "BuildWindow", "building", "window"]

#: Generations that may be unloaded without a full collection before a build runs one.
MAX_DEFERRED = 4
#: The generation-2 threshold while builds run (out of reach; recognisable).
SENTINEL = 2_000_000_011
_DEFAULT_THRESHOLD_2 = 10


class BuildWindow:
    """Process-wide state of the builds in progress (one instance: :data:`window`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: Builds in progress.
        self.active = 0
        #: Generations unloaded since the last full collection (from any source).
        self.unloaded_since_full = 0
        #: Full collections this module ran itself (see MAX_DEFERRED).
        self.forced = 0
        self._saved_interval: float | None = None
        self._set_interval: float | None = None
        self._deferring = 0
        self._saved_threshold_2: int | None = None
        self._full_seen = gc.get_stats()[2]["collections"]

    def enter(self, switch_interval: float | None, defer_full_gc: bool) -> None:
        with self._lock:
            self.active += 1
            if switch_interval is not None and switch_interval > 0:
                current = sys.getswitchinterval()
                if self._saved_interval is None:
                    self._saved_interval = current
                if switch_interval < current:
                    sys.setswitchinterval(switch_interval)
                    self._set_interval = sys.getswitchinterval()
            if defer_full_gc:
                self._deferring += 1
                if self._deferring == 1:
                    t0, t1, t2 = gc.get_threshold()
                    # a stale SENTINEL (someone saved and restored ours): the default
                    self._saved_threshold_2 = _DEFAULT_THRESHOLD_2 if t2 == SENTINEL else t2
                    gc.set_threshold(t0, t1, SENTINEL)

    def exit(self, defer_full_gc: bool) -> None:
        collect = False
        with self._lock:
            self.active -= 1
            # full collections of any source (not a gc callback: Python code run inside
            # a collection lets threads switch in the middle of compile() of an AST,
            # whose depth counter CPython 3.11 shares between threads)
            self._sync()
            if defer_full_gc:
                self._deferring -= 1
                if self._deferring == 0 and self._saved_threshold_2 is not None:
                    t0, t1, t2 = gc.get_threshold()
                    if t2 == SENTINEL:
                        gc.set_threshold(t0, t1, self._saved_threshold_2)
                    self._saved_threshold_2 = None
            if self.active == 0 and self._saved_interval is not None:
                # put back only what this module set (another change is kept)
                if self._set_interval is None or sys.getswitchinterval() == self._set_interval:
                    sys.setswitchinterval(self._saved_interval)
                self._saved_interval = None
                self._set_interval = None
            if defer_full_gc and self.unloaded_since_full >= MAX_DEFERRED:
                collect = True
        if collect:
            gc.collect()
            with self._lock:
                self.forced += 1
                self._sync()

    def note_unloaded(self) -> None:
        """A generation was unloaded: its objects are garbage for a full collection."""
        with self._lock:
            self._sync()
            self.unloaded_since_full += 1

    def _sync(self) -> None:
        full = gc.get_stats()[2]["collections"]
        if full != self._full_seen:
            self._full_seen = full
            self.unloaded_since_full = 0


#: The one window of this process (the switch interval and the collector are global).
window = BuildWindow()


@contextlib.contextmanager
def building(switch_interval_ms: float = 0.25, defer_full_gc: bool = True) -> Iterator[None]:
    """Hold the build window while the block runs (nests; threads may share it)."""
    # (below 10 us the interpreter would do little but switch threads)
    interval = max(switch_interval_ms, 0.01) / 1000 if switch_interval_ms > 0 else None
    window.enter(interval, defer_full_gc)
    try:
        yield
    finally:
        window.exit(defer_full_gc)
