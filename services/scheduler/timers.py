"""The timer: one heap of due times and one sleeper, so thousands of schedules cost
one wake-up per due time, not a poll over every schedule.

Entries are keyed; re-arming or cancelling a key just bumps its token, and stale heap
entries are dropped when they surface (lazy deletion keeps both operations O(log n)).
The sleeper waits on ``loop.call_at`` for the earliest entry and is woken early when an
earlier one is pushed. :class:`StartGate` is the precise last wait of a run, from its
recorded start to its due time.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from services.scheduler.idle import Idle

__all__ = ["StartGate", "TimerQueue"]

log = logging.getLogger("xcore.scheduler")

Callback = Callable[[], None]


class TimerQueue:
    """Calls a key's callback once its time (UTC epoch seconds) has come.

    An entry armed ``early`` is kept by its instant and fires :attr:`lead` seconds
    before it, the lead read when the timer sleeps, not when the entry was armed: a
    lead learnt since (the way from a timer to a durable start grew) applies to every
    schedule at once, the ones armed at boot included. All the early entries of one
    instant are one heap entry and fire together, in the order they were armed.

    ``hold`` (optional) gives what the callbacks of one instant queue their work in (the
    runner's claims): it is held while the instant's callbacks run, over as many slices
    as they take (at most :attr:`hold_max` at a time), so the runs of one instant still
    go to the store in one batch.
    """

    #: Callbacks due together run in slices of at most this long (seconds) between
    #: which the event loop serves other work.
    slice = 0.005
    #: The claims of one instant are held at most this long (seconds) while its
    #: callbacks run: a huge instant (10,000 runs due at once) sends its claims every
    #: this often, so its first runs do not wait for the last one's callback.
    hold_max = 0.02
    #: The sleeper wakes at least this often (seconds) to read the wall clock again: due
    #: times are wall-clock instants but the loop sleeps on the monotonic clock, so a
    #: wall clock stepped forward (an NTP correction, a VM or laptop resumed from
    #: suspend, which the monotonic clock does not count) would otherwise leave every
    #: due run late by the step, until the sleep computed before it ends.
    max_sleep = 1.0

    def __init__(
        self,
        lead: Callable[[], float] | None = None,
        hold: Callable[[], _Holdable | None] | None = None,
    ) -> None:
        self._heap: list[tuple[float, int, str]] = []
        self._live: dict[str, tuple[int, Callback]] = {}
        self._seq = itertools.count()
        #: early entries: instant -> {key: callback}; a heap of the instants; key -> instant
        self._instants: dict[float, dict[str, Callback]] = {}
        self._early_heap: list[float] = []
        self._early_at: dict[str, float] = {}
        self._lead = lead or (lambda: 0.0)
        self._hold = hold or (lambda: None)
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None
        self._target: float | None = None

    def __len__(self) -> int:
        return len(self._live) + len(self._early_at)

    def arm(self, key: str, when: float, callback: Callback, *, early: bool = False) -> None:
        """Call ``callback`` at ``when`` (``early``: :attr:`lead` before it); replaces
        whatever ``key`` was armed with."""
        self.cancel(key)
        if early:
            group = self._instants.get(when)
            if group is None:
                group = self._instants[when] = {}
                heapq.heappush(self._early_heap, when)
            group[key] = callback
            self._early_at[key] = when
            when -= self._lead()
        else:
            seq = next(self._seq)
            self._live[key] = (seq, callback)
            heapq.heappush(self._heap, (when, seq, key))
        if self._target is None or when < self._target:
            self._poke()

    def cancel(self, key: str) -> None:
        self._live.pop(key, None)
        at = self._early_at.pop(key, None)
        if at is not None and (group := self._instants.get(at)) is not None:
            group.pop(key, None)

    def lead_changed(self) -> None:
        """The lead grew: the sleeper re-computes when to wake."""
        if self._early_heap:
            self._poke()

    def next_time(self, slack: float = 0.0) -> float | None:
        """The earliest armed time (an entry cancelled since may answer: it is a hint).

        ``slack``: how much later than its lead an early entry may fire and still be on
        time (see ``Dispatcher.next_deadline``)."""
        times = []
        if self._heap:
            times.append(self._heap[0][0])
        if self._early_heap:
            times.append(self._early_heap[0] - self._lead() + slack)
        return min(times) if times else None

    def when(self, key: str) -> float | None:
        at = self._early_at.get(key)
        if at is not None:
            return at - self._lead()
        live = self._live.get(key)
        if live is None:
            return None
        for when, seq, k in self._heap:
            if k == key and seq == live[0]:
                return when
        return None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="xcore-scheduler-timer")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _poke(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def _due(self, now: float) -> tuple[float | None, list[tuple[str, Callback]]] | None:
        """The next callback(s) due at ``now``: one exact entry (instant None), or every
        early entry of one instant (None: nothing is due)."""
        heap, early = self._heap, self._early_heap
        lead = self._lead()
        while True:
            exact_at = heap[0][0] if heap else None
            early_at = early[0] - lead if early else None
            if (
                early_at is not None
                and early_at <= now
                and (exact_at is None or early_at <= exact_at)
            ):
                instant = heapq.heappop(early)
                group = self._instants.pop(instant)
                if group:
                    return instant, list(group.items())
                continue
            if exact_at is not None and exact_at <= now:
                _, seq, key = heapq.heappop(heap)
                live = self._live.get(key)
                if live is None or live[0] != seq:
                    continue
                del self._live[key]
                return None, [(key, live[1])]
            return None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        heap, early = self._heap, self._early_heap
        while True:
            now = time.time()
            began = time.perf_counter()
            while (due := self._due(now)) is not None:
                instant, callbacks = due
                held = self._hold() if instant is not None and len(callbacks) > 1 else None
                if held is not None:
                    held.hold()
                try:
                    began = await self._fire(instant, callbacks, began, held)
                finally:
                    if held is not None:
                        held.release()
            while heap and self._live.get(heap[0][2], (None,))[0] != heap[0][1]:
                heapq.heappop(heap)
            while early and not self._instants[early[0]]:
                del self._instants[heapq.heappop(early)]
            self._wake = wake = loop.create_future()
            handle = None
            self._target = self.next_time()
            if self._target is not None:
                delay = min(self._target - time.time(), self.max_sleep)
                handle = loop.call_at(loop.time() + delay, _done, wake)
            try:
                await wake
            finally:
                if handle is not None:
                    handle.cancel()
                self._wake = None

    async def _fire(
        self,
        instant: float | None,
        callbacks: list[tuple[str, Callback]],
        began: float,
        held: _Holdable | None = None,
    ) -> float:
        """Call ``callbacks`` (those of ``instant``, or one exact entry) in slices of
        :attr:`slice`, flushing ``held`` every :attr:`hold_max`; returns when the
        current slice began."""
        held_since = time.perf_counter()
        for key, callback in callbacks:
            if instant is not None:
                # still armed for this instant (not cancelled, nor re-armed for it anew,
                # while the loop served others between two slices)?
                if self._early_at.get(key) != instant or key in self._instants.get(instant, ()):
                    continue
                del self._early_at[key]
            try:
                callback()
            except Exception:
                log.exception("scheduler timer callback for %r failed", key)
            if time.perf_counter() - began > self.slice:
                # Many callbacks due at once (a burst, a boot after downtime): let the
                # loop serve others between slices, so HTTP is not stalled by them.
                if held is not None and time.perf_counter() - held_since > self.hold_max:
                    held.flush()  # what the callbacks so far queued goes now
                    held_since = time.perf_counter()
                await asyncio.sleep(0)
                began = time.perf_counter()
        return began


class _Holdable(Protocol):
    def hold(self) -> None: ...
    def release(self) -> None: ...
    def flush(self) -> None: ...


def _done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class StartGate:
    """Waits until an exact instant with sub-millisecond precision.

    asyncio's timers wake up to ~1 ms late on Linux: the selector's timeout is in whole
    milliseconds, rounded up. A run's last wait, from its recorded ``TaskStarted`` to
    its due time, is short, so the gate waits on the loop until :attr:`margin` before
    the instant, then a helper thread sleeps the rest (``nanosleep``, ~0.1 ms precise)
    and wakes the loop, which finishes with a few idle iterations (at most
    :attr:`handoff`) so nothing starts early. Waiters of the same instant share one
    wake-up and resume in one loop step, in the order they started waiting.
    """

    #: Coarse wait on the loop ends this long before the instant (> the selector's 1 ms).
    margin = 0.002
    #: The thread wakes the loop this long before the instant: ``time.sleep`` overshoots
    #: by ~0.1 ms and the loop takes ~0.15 ms more to run the wake-up (measured here).
    handoff = 0.0004

    def __init__(self) -> None:
        self._groups: dict[float, list[asyncio.Future[None]]] = {}
        #: the coarse wait of each instant whose group is not handed off yet
        self._handles: dict[float, asyncio.TimerHandle] = {}
        self._thread: ThreadPoolExecutor | None = None
        self._closed = False
        #: woken when no run waits for an instant any more (:meth:`idle`)
        self._idlers = Idle(lambda: bool(self._groups))

    @property
    def pending(self) -> bool:
        """Whether runs wait for an instant (claimed ahead, not released yet)."""
        return bool(self._groups)

    async def idle(self, timeout: float) -> None:
        """Return once no run waits for an instant (or after ``timeout`` seconds)."""
        await self._idlers.wait(timeout)

    def _released(self) -> None:
        self._idlers.notify()

    def close(self) -> None:
        """Stop for good: pending coarse waits are cancelled (their waiters with them);
        an instant already handed to the helper thread is still released on time."""
        self._closed = True
        handles, self._handles = self._handles, {}
        for when, handle in handles.items():
            handle.cancel()
            for fut in self._groups.pop(when, ()):
                fut.cancel()
        self._released()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.shutdown(wait=False, cancel_futures=True)

    async def wait_until(self, when: float) -> None:
        """Return at ``when`` (UTC epoch seconds), or at once if it has passed."""
        if when <= time.time():
            return
        if self._closed:
            raise RuntimeError("the start gate is closed (the scheduler is stopping)")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        group = self._groups.get(when)
        if group is None:
            group = self._groups[when] = []
            coarse = when - self.margin - time.time()
            self._handles[when] = loop.call_at(
                loop.time() + max(coarse, 0.0), self._hand_off, loop, when
            )
        group.append(fut)
        await fut

    def _hand_off(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        self._handles.pop(when, None)
        if self._closed:
            return
        left = when - time.time()
        if left <= self.handoff:
            self._spin(loop, when)
            return
        if left > self.margin:  # the wall clock stepped back meanwhile: wait on the loop
            self._coarse(loop, when, left)
            return
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xcore-gate")
        self._thread.submit(self._sleep_then_wake, loop, when)

    def _sleep_then_wake(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        # Runs in the helper thread: it touches no state of the gate, the loop does.
        # (at most the margin: a wall clock stepped back does not hold the thread, which
        # every instant shares, for the length of the step)
        time.sleep(min(self.margin, max(0.0, when - self.handoff - time.time())))
        try:
            loop.call_soon_threadsafe(self._spin, loop, when)
        except RuntimeError:  # the loop closed meanwhile: nobody waits any more
            log.debug("start gate: the loop closed before the instant %.6f", when)

    def _coarse(self, loop: asyncio.AbstractEventLoop, when: float, left: float) -> None:
        """Wait on the loop again until :attr:`margin` before ``when`` (``left`` away)."""
        if self._closed:
            for fut in self._groups.pop(when, ()):
                fut.cancel()
            self._released()
            return
        self._handles[when] = loop.call_at(
            loop.time() + left - self.margin, self._hand_off, loop, when
        )

    def _spin(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        left = when - time.time()
        if left > self.handoff:
            # the wall clock stepped back since the hand-off: wait again (on the loop,
            # or in the thread), never a busy loop for the length of the step
            if self._closed:
                self._coarse(loop, when, left)  # (cancels the instant's waiters)
            else:
                self._hand_off(loop, when)
            return
        if left > 0:
            loop.call_soon(self._spin, loop, when)
            return
        for fut in self._groups.pop(when, ()):
            if not fut.done():
                fut.set_result(None)
        self._released()
