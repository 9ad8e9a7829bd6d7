"""Threads building a plugin generation leave the interpreter to the event loop most of the time.

Guarantee: while a generation is built (the loader's build window is open), a thread that
builds routes — FastAPI declaring a plugin's routes as its ``router.py`` is imported, the
router copying them at their public paths — computes at most :func:`share` of the wall
time (``build_cpu_share`` of ``services.loader``, 0.3 by default), so the requests other
plugins serve meanwhile get the interpreter back for the rest instead of alternating with
the build every switch interval. A build takes longer in wall time (about 1/share of its
CPU time); its CPU cost is unchanged.

Mechanism: Python runs one thread at a time, and a thread waiting for the interpreter
takes it from the running one after the switch interval, so a build thread that never
waits slices every request of the event loop into switch-interval pieces. Build code
calls :func:`pace` between units of work (after each route is declared or copied, each
validator built by services/loader/lazy.py); once the calling thread has computed
``quantum`` seconds of CPU since its last pause, it sleeps (releasing the interpreter)
long enough to bring its share down to ``share``. Calls from the event loop's thread, or
while no build is open (``share`` is 1), return at once. *The loop first:* at each unit
a build thread also waits, at most :data:`yield_max` (``build_yield_ms`` of
``services.loader``), while the event loop has work (:func:`loop_busy`): HTTP requests
being handled (:data:`serving`, counted by the router's dispatcher until each response
starts: a streamed body does not hold builds), or, once the loop is watched
(:func:`watch_loop`; the loader's ``build_watch_loop``, off by default: measured, it
lengthened reloads without moving the neighbour's p99), the loop awake — not asleep in
its selector, or its selector's descriptor readable (uvicorn reading a
request or writing a response, every socket call of which handed the interpreter to the
build thread and waited a switch interval to get it back). It is woken when the loop
goes back to sleep or the last request ends, so a request that arrives finds at most one
unit of build work in its way instead of the build's whole share; under a saturated load the
build still advances one unit per wait, and a thread's waits in one window add up to at
most :data:`WAIT_PER_CPU` times the CPU time it computed plus :data:`WAIT_ALLOWANCE` (a
build's wall time at most triples, however long requests keep arriving). With ``fine``
(the loader's ``build_fine_yield``), a paced build thread also looks for the loop between
every two function calls of a unit, through a profile function (:func:`_new_hook`).
:func:`install` makes FastAPI's ``APIRouter.add_api_route`` (what every route decorator
calls) pace after each route. A thread given an
:class:`Account` (:func:`account`) adds each pause to it: a caller bounding the thread's
work by a timeout leaves the paused time out (the loader's ``import_timeout``); a caller
that gave up on the thread marks its account abandoned, and the thread's next
:func:`pace` raises :class:`Abandoned` (a timed-out import declaring routes in an
endless loop stops there). While the collector raised the young threshold for paced
builds (kernel/collector.py ``young_paced``), :func:`pace` also runs the young passes
that are due, after its wait for the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import select
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, ParamSpec, TypeVar

from kernel.collector import collector

P = ParamSpec("P")
R = TypeVar("R")

__all__ = [
    "Abandoned",
    "Account",
    "account",
    "check",
    "install",
    "leave",
    "leaving",
    "loop_busy",
    "pace",
    "set_share",
    "share",
    "stats",
    "unwatch_loop",
    "watch_loop",
]

#: CPU seconds a thread computes between two pauses (pauses shorter than this are noise).
quantum = 0.002

_share = 1.0
#: Bumped each time pacing opens: a pooled thread's mark from an earlier build is stale.
_epoch = 0
#: Longest single pause (s): a unit of work that was long is not repaid all at once.
max_pause = 0.05
_local = threading.local()
_lock = threading.Lock()
_installed = False
#: Seconds slept by pacing so far (benchmarks read it).
slept = 0.0
#: HTTP requests being handled right now, until their response starts (counted by the
#: router's dispatcher, on the event loop; read here without a lock: a stale read costs
#: one unit of waiting or not).
serving = 0
#: Longest a build thread waits, per unit of work, for the requests in flight to end
#: (seconds; 0: it does not wait). Set with :func:`set_share`.
yield_max = 0.0
#: Set when ``serving`` drops to 0 or the watched loop goes to sleep while a build thread
#: waits (:func:`request_ended`, :class:`_LoopWatch`).
_idle = threading.Event()
#: Waits build threads made for the loop so far, and their seconds (``/health`` shows them).
gave_way = 0
gave_way_s = 0.0
#: Young collections build threads ran between units of work (kernel/collector.py).
young_passes = 0
_waiting = 0
#: Whether paced build threads also look for the loop between every two function calls
#: of their work, not only between units (:func:`set_share`'s ``fine``; :func:`_new_hook`).
_fine = False
#: Function calls a thread skips looking after a look found the loop busy but the thread
#: could not wait (its waits reached its CPU time, or ``yield_max`` is 0), or after a
#: wait that ran out (the loop neither slept nor ended its requests meanwhile).
SKIP_AFTER_DENIED = 2000
#: A thread's waits for the loop in one window add up to at most this many times the CPU
#: time it computed in it, plus :data:`WAIT_ALLOWANCE` seconds (its first units, before
#: it computed much, wait too): under any load a build's wall time stays within
#: ``1 + WAIT_PER_CPU`` times its paced length, plus the allowance. With the loop at
#: work half the time, a build needs about as much waiting as computing.
WAIT_PER_CPU = 2.0
WAIT_ALLOWANCE = 0.05
#: Waits build threads made from their profile hook (a subset of :data:`gave_way`).
fine_waits = 0


class Abandoned(BaseException):
    """Raised in a build thread its caller gave up on (:attr:`Account.abandoned`) at its
    next unit of build work: a timed-out import that keeps declaring routes stops there
    instead of growing the process forever. A ``BaseException``, so that a plugin's
    ``except Exception`` does not swallow it."""


class Account:
    """Seconds one thread has slept in :func:`pace` (read from any thread); set
    :attr:`abandoned` to stop the thread at its next :func:`pace` or :func:`check`."""

    __slots__ = ("abandoned", "paused")

    def __init__(self) -> None:
        self.paused = 0.0
        self.abandoned = False


def account(target: Account | None) -> None:
    """Add the calling thread's pauses to ``target`` from now on (None: stop)."""
    _local.account = target


def share() -> float:
    """The share of wall time a build thread may compute now (1: no pacing)."""
    return _share


def set_share(value: float, yield_s: float = 0.0, fine: bool = False) -> None:
    """Open (value < 1) or close (1) the pacing of build threads (the build window);
    ``yield_s``: how long a build thread waits, per unit, for requests in flight;
    ``fine``: build threads also look for the loop between two function calls."""
    global _share, _epoch, yield_max, _fine
    value = min(max(value, 0.05), 1.0)
    if value < 1.0 and _share >= 1.0:
        _epoch += 1
    _share = value
    yield_max = max(yield_s, 0.0) if value < 1.0 else 0.0
    _fine = fine and value < 1.0 and yield_max > 0


def request_ended() -> None:
    """Called by the dispatcher after it decremented :data:`serving` (loop thread)."""
    if serving == 0 and _waiting:
        _idle.set()


class _LoopWatch:
    """Whether the watched event loop has work: it is not asleep in its selector, or
    its selector has events ready (it is waking up: taking the interpreter back).

    Its selector's ``select`` is wrapped (an attribute of the selector object, removed
    by :meth:`close`): a call that may sleep (a timeout other than 0) marks the loop
    asleep for its duration and wakes the build threads giving way. While marked asleep,
    :meth:`busy` asks the kernel whether the selector's own descriptor (epoll, kqueue)
    is readable, i.e. whether the loop is about to wake up: that poll is a system call
    made without the interpreter, so a loop already woken takes the interpreter then.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        selector = getattr(loop, "_selector", None)
        if selector is None or not callable(getattr(selector, "select", None)):
            raise TypeError(f"{type(loop).__name__} has no selector to watch")
        self.loop = loop
        #: The loop's thread (it never waits for itself; not always the main thread).
        self.thread: int = getattr(loop, "_thread_id", None) or threading.get_ident()
        self.selector = selector
        self.original = selector.select
        self.asleep = False
        #: Times the loop woke from a sleep with events to handle (a request, a reply).
        self.woken = 0
        self.holders = 1
        #: The selector's own descriptor (epoll, kqueue; None: the asleep mark alone).
        self.fd: int | None = None
        fileno = getattr(selector, "fileno", None)
        if callable(fileno) and hasattr(select, "poll"):
            with contextlib.suppress(OSError, ValueError, TypeError):
                self.fd = int(fileno())
        #: One poll object per build thread (concurrent polls of one object are refused).
        self._pollers = threading.local()
        selector.select = self._select

    def _select(self, timeout: float | None = None) -> Any:
        if timeout is not None and timeout <= 0:  # a look, not a sleep: still at work
            return self.original(timeout)
        self.asleep = True
        if _waiting:
            _idle.set()
        try:
            ready = self.original(timeout)
        finally:
            self.asleep = False
        if ready:
            self.woken += 1
        return ready

    def busy(self) -> bool:
        if not self.asleep:
            return True
        if self.fd is None:
            return False
        try:
            poller = getattr(self._pollers, "poller", None)
            if poller is None:
                poller = self._pollers.poller = select.poll()
                poller.register(self.fd, select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError, RuntimeError):  # (the loop closed its selector)
            return False

    def close(self) -> None:
        # (only our own wrapper; the selector may have been closed and replaced)
        if self.selector.__dict__.get("select") == self._select:
            del self.selector.select


_watch: _LoopWatch | None = None


def watch_loop(loop: asyncio.AbstractEventLoop) -> bool:
    """Build threads give way to ``loop`` while it has work, not only while a plugin
    request is handled (uvicorn reading a request, writing a response, the kernel's
    own tasks): :func:`unwatch_loop` undoes it (calls nest). False if ``loop`` cannot
    be watched (no selector: then only :data:`serving` counts)."""
    global _watch
    with _lock:
        current = _watch
        if current is not None and current.loop is loop:
            current.holders += 1
            return True
        try:
            watch = _LoopWatch(loop)
        except TypeError:
            return False
        if current is not None:  # another loop (an earlier kernel's): this one now
            current.close()
        _watch = watch
        return True


def unwatch_loop(loop: asyncio.AbstractEventLoop) -> None:
    """One holder of :func:`watch_loop` on ``loop`` is done (the last one unwraps it)."""
    global _watch
    with _lock:
        current = _watch
        if current is None or current.loop is not loop:
            return
        current.holders -= 1
        if current.holders <= 0:
            current.close()
            _watch = None


def loop_busy() -> bool:
    """Plugin requests are handled, or the watched event loop has work (any thread)."""
    if serving > 0:
        return True
    watch = _watch
    return watch is not None and watch.busy()


def stats() -> dict[str, Any]:
    """What pacing did so far in this process (``/health`` -> ``loader.pacing``)."""
    return {
        "share": _share,
        "watching_loop": _watch is not None,
        "paused_s": round(slept, 3),
        "gave_way": gave_way,
        "gave_way_s": round(gave_way_s, 3),
        "young_passes": young_passes,
        "fine_waits": fine_waits,
    }


def _wait_for_requests() -> float:
    """Wait (at most :data:`yield_max`) while the loop has work (:func:`loop_busy`);
    seconds waited.

    Bounded in total: a thread's waits within one build window never add up to more
    than :data:`WAIT_PER_CPU` times the CPU time it has computed in that window plus
    :data:`WAIT_ALLOWANCE` (and one wait), so a constant stream of requests (long polls
    never start their response, a saturated loop) at most triples a build's wall time
    instead of stretching it without end."""
    global _waiting, gave_way, gave_way_s
    limit = yield_max
    if limit <= 0 or not loop_busy():
        return 0.0
    cpu = time.thread_time()
    budget = getattr(_local, "yield_budget", None)
    if budget is None or budget[0] != _epoch:
        # [window, CPU time at the window's first wait, seconds waited since]
        budget = _local.yield_budget = [_epoch, cpu, 0.0]
    if budget[2] > WAIT_PER_CPU * (cpu - budget[1]) + WAIT_ALLOWANCE:
        return 0.0
    start = time.perf_counter()
    with _lock:
        _waiting += 1
        _idle.clear()
    woke = True
    try:
        if loop_busy():  # (again once registered: a wake-up in between is not lost)
            woke = _idle.wait(limit)
    finally:
        with _lock:
            _waiting -= 1
    waited = time.perf_counter() - start
    _local.ran_out = not woke
    budget[2] += waited
    gave_way += 1
    gave_way_s += waited
    return waited


def _note_wait(waited: float) -> None:
    global slept
    slept += waited
    target = getattr(_local, "account", None)
    if target is not None:
        target.paused += waited


def _new_hook() -> Callable[[FrameType, str, Any], None]:
    """A profile function for one paced build thread: between two function calls of
    its work it looks whether the loop has work (plugin requests in flight, or the
    watched loop awake) and, if so, gives way as :func:`pace` does between units.

    Why: a build thread that holds the interpreter in the middle of a unit takes it
    back at every system call the loop makes (each socket read and write, each look
    at its selector) and keeps it a switch interval each time, so a request that
    arrives during a unit pays that wait several times. Once the thread waits on an
    event instead, the loop keeps the interpreter through its system calls; a
    request pays one hand-over (the switch interval, for the loop to take the
    interpreter back and mark itself awake). The look costs the build thread about as
    much CPU time again (a Python call per function call: ~0.4 s for a 300-route
    plugin); it is made only while the window is paced and requests reach the loop
    (:func:`pace`), and the hook removes itself once the window closes."""
    skip = 0

    def hook(frame: FrameType, event: str, arg: Any) -> None:
        nonlocal skip
        global fine_waits
        if skip:
            skip -= 1
            return
        if not _fine:  # the window closed: this thread's work is its own again
            sys.setprofile(None)
            return
        watch = _watch
        if serving > 0 or (watch is not None and not watch.asleep):
            waited = _wait_for_requests()
            if waited:
                fine_waits += 1
                _note_wait(waited)
            # not allowed to wait now (its waits reached its CPU time), or the wait ran
            # out: the loop may be blocked on a lock this thread holds (a logging
            # handler's), and waiting again at each call would stall it each time
            if not waited or getattr(_local, "ran_out", False):
                skip = SKIP_AFTER_DENIED

    hook.xcore_pacing = True  # type: ignore[attr-defined]
    return hook


def check() -> None:
    """Raise :class:`Abandoned` if the calling thread's caller gave up on it."""
    target = getattr(_local, "account", None)
    if target is not None and target.abandoned:
        raise Abandoned("the loader gave up on this thread (its timeout expired)")


def pace() -> None:
    """Between two units of build work: pause if this thread took more than its share
    (and stop it, :class:`Abandoned`, if its caller gave up on it)."""
    check()
    if _share >= 1.0 or threading.current_thread() is threading.main_thread():
        return
    watch = _watch
    if watch is not None and watch.thread == threading.get_ident():
        return  # the watched loop's own thread (a loop run outside the main thread)
    # this thread's profile hook stays out of pacing's own waits (its locks)
    profile = sys.getprofile()
    ours = getattr(profile, "xcore_pacing", False)
    if ours:
        sys.setprofile(None)
    try:
        _pace()
    finally:
        # (another profiler is left alone; with no work reaching the loop since the
        # last unit, the next unit runs without the hook and its cost)
        if _fine and (ours or profile is None) and _loop_was_woken():
            sys.setprofile(profile if ours else _new_hook())


def leave() -> None:
    """The calling thread's build work is over (a pooled executor thread going back to
    its pool): take its fine-yield hook off, so that its next job, not a build, does not
    wait for the loop at every function call while the window is still open."""
    if getattr(sys.getprofile(), "xcore_pacing", False):
        sys.setprofile(None)


def leaving(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn``, then :func:`leave` however it ends (build work run in a pooled thread)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        finally:
            leave()

    return wrapper


def _loop_was_woken() -> bool:
    """Requests are in flight, or the watched loop woke up for events since this
    thread's last unit (without a watched loop: True)."""
    watch = _watch
    if watch is None:
        return True
    seen = getattr(_local, "woken", None)
    _local.woken = watch.woken
    return serving > 0 or seen != watch.woken


def _pace() -> None:
    global slept, young_passes
    current = _share
    waited = _wait_for_requests()
    young = collector.young_due()
    if young is not None:
        # (the loop just went idle, or has no work: the pass now holds up no request)
        gc.collect(young)
        young_passes += 1
    if waited:
        _note_wait(waited)
    now = time.thread_time()
    mark = getattr(_local, "mark", None)
    if mark is None or mark[0] != _epoch:
        _local.mark = (_epoch, now)
        return
    spent = now - mark[1]
    if spent < quantum:
        return
    pause = min(spent * (1 - current) / current, max_pause)
    time.sleep(pause)
    _note_wait(pause)
    _local.mark = (_epoch, time.thread_time())


def install() -> None:
    """Pace after every route FastAPI's APIRouter declares (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        try:
            from fastapi import routing
        except ImportError:  # pragma: no cover - FastAPI is a dependency
            return
        original = routing.APIRouter.add_api_route

        @functools.wraps(original)
        def add_api_route(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return original(self, *args, **kwargs)
            finally:
                pace()

        routing.APIRouter.add_api_route = add_api_route  # type: ignore[method-assign]
        _installed = True
