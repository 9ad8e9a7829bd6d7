"""An unmounted generation's app is taken apart, so refcounting frees it: no full collection.

Guarantee: once a plugin generation is withdrawn and its last request in flight has
ended, its routes — and with them nearly everything a generation allocates: FastAPI's
dependants and fields, pydantic's validators and serializers, ~150 objects a route —
are freed by reference counting, in slices of at most :data:`SLICE_S` of the event
loop, instead of waiting as cyclic garbage for a full collection (one that walks every
object allocated since the boot, 30-200 ms with the interpreter held, kernel/collector.py).
What stays for the collector is small (the generation's module dicts, functions and
classes, ~7 objects per route of the 300-route benchmark plugin instead of ~150), and it
tells the collector so (:meth:`kernel.collector.Collector.note_freed`): such unloads do
not set off a full collection of their own.

Mechanism: a FastAPI app is one reference cycle (its router points back to the app as
``dependency_overrides_provider``, to itself through bound methods; each route's request
handler holds the app), so everything it holds, every route, lives as long as the cycle.
Its routes are reached from nowhere else once the generation is withdrawn: the dispatcher's
table no longer has it, FastAPI's per-endpoint caches were pruned
(``mounts.forget_endpoints``; again once its last request has ended, when requests
were in flight: they refill them), and the loader emptied the plugin's own ``APIRouter``
(services/loader/lifecycle.py; the copies the app serves held its routes). Emptying the
app's route list therefore frees each route as it is removed. That happens only once no
request is in flight on the generation (:class:`services.router.dispatcher.InFlight`): a
request that entered the old app and waits (an access check, a slow handler, a
websocket) keeps its routes to the end. The list is emptied from the end, a few routes
at a time, each slice a loop callback of at most :data:`SLICE_S`, so the deallocation of
a big generation never stalls the other plugins' requests. A generation withdrawn while
requests were in flight (a stream, a long poll, a websocket) is *draining* until they
end and it has been taken apart (:meth:`kernel.collector.Collector.note_draining`): no
full collection can free it then, so none is run for it and none counts against it in
the loader's leak report (``/health`` lists it under ``loader.draining_generations``);
it calls for one only if its routes are still referenced afterwards. Afterwards a weak reference
to one of the routes tells whether they were freed (a plugin, a cache or a thread may
still hold one: the generation is then left to the collector as before).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import Any

from fastapi import FastAPI

from kernel.collector import collector
from services.router.dispatcher import Mount
from services.router.mounts import forget_app_endpoints

__all__ = ["SLICE_S", "Dismantler"]

log = logging.getLogger("xcore.router")

#: Longest slice of the event loop one step of a dismantling takes (s): a request that
#: arrives meanwhile waits at most this (1 ms slices were a fifth of the loop's work that
#: delayed a reload's neighbour by more than 1 ms).
SLICE_S = 0.00025
#: Routes removed between two looks at the clock.
_BATCH = 4


class Dismantler:
    """Takes unmounted generations' apps apart on the event loop, a slice at a time."""

    def __init__(self) -> None:
        #: Generations whose routes were freed by refcounting / left to the collector.
        self.freed = 0
        self.kept = 0
        #: Generations waiting for their last request, or being taken apart.
        self.pending = 0
        #: Those (plugin, generation) told to the collector as draining.
        self._draining: set[tuple[str, int]] = set()
        #: Of those, the ones that were still serving requests when withdrawn.
        self._busy: set[tuple[str, int]] = set()
        self._closed = False

    def retire(self, mount: Mount) -> None:
        """``mount`` was withdrawn: take its app apart once its requests have ended."""
        app = mount.app
        if not mount.owned or not isinstance(app, FastAPI):
            return  # an app the mounter did not build (a sandbox proxy): not ours
        self.pending += 1
        key = (mount.plugin, mount.generation)
        label = f"plugin {mount.plugin!r} generation {mount.generation}"
        # a collection cannot free it while it serves requests or is taken apart: none
        # is due for its unload, and one meanwhile does not make it a leak
        # (kernel/collector.py); it calls for one only if its routes are kept
        self._draining.add(key)
        collector.note_draining(key)
        if mount.in_flight.count:
            self._busy.add(key)
        mount.in_flight.when_idle(lambda: self._start(app, label, key))

    def close(self) -> None:
        """Stop (the service stops): what is left goes to the collector."""
        self._closed = True
        for key in self._draining:
            collector.draining.pop(key, None)
        self._draining.clear()
        self._busy.clear()

    def _start(self, app: FastAPI, label: str, key: tuple[str, int]) -> None:
        if key in self._busy:
            # its requests went on classifying their dependencies after the unmount
            # pruned FastAPI's caches (forget_endpoints): they hold its callables again
            forget_app_endpoints(app)
        routes: list[Any] = app.router.routes
        sample: weakref.ref[Any] | None = None
        if routes:
            try:
                sample = weakref.ref(routes[0])  # (no local name may hold it)
            except TypeError:
                sample = None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or self._closed:
            routes.clear()
            self._done(sample, label, key)
            return

        def step() -> None:
            deadline = time.perf_counter() + SLICE_S
            try:
                while routes:
                    del routes[-_BATCH:]
                    if time.perf_counter() >= deadline:
                        break
            except Exception:  # a route's finalizer: never leave the loop a callback error
                log.exception("%s: taking its routes apart failed; left to the collector", label)
                routes.clear()
            if routes and not self._closed:
                loop.call_soon(step)
            else:
                routes.clear()
                self._done(sample, label, key)

        step()

    def _done(self, sample: weakref.ref[Any] | None, label: str, key: tuple[str, int]) -> None:
        self.pending -= 1
        drained = key in self._draining
        self._draining.discard(key)
        self._busy.discard(key)
        if sample is not None and sample() is None:
            self.freed += 1
            collector.note_freed(key if drained else None)
        else:
            self.kept += 1
            if drained:
                collector.note_kept(key)
            log.debug("%s: its routes are still referenced; left to the collector", label)
