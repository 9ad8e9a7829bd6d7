"""The global concurrency limit: at most ``limit`` runs at once; when it is reached,
the waiting run with the highest priority starts first, ties in order of due time.

The number of runs waiting is kept as a count, not recounted over the heap: it is read
on every run's path (whether to write its start record while it waits), and a scan made
each of 100 runs due at once pay for the others — quadratic once a backlog forms.

:meth:`PrioritySlots.line_moved` lets the runs that just gave their slot back wait, a
bounded number of loop steps, for the runs waiting for a slot to have one (their
outcomes are built after those start): one callback per loop step checks the line for
all of them, instead of each polling it with a task step of its own every loop step
(~9 task steps per run of an instant of 100 runs on 32 slots).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

__all__ = ["PrioritySlots"]


class PrioritySlots:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.busy = 0
        self._waiters: list[tuple[int, float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        #: waiters neither granted a slot nor cancelled
        self._pending = 0
        #: the callers of :meth:`line_moved` waiting, and the loop steps left to them
        self._movers: list[asyncio.Future[None]] = []
        self._steps_left = 0

    @property
    def free(self) -> bool:
        """True when :meth:`acquire` would not wait."""
        return self.busy < self.limit and not self._waiters

    @property
    def waiting(self) -> int:
        """Runs waiting for a slot (granted or cancelled ones no longer count)."""
        return self._pending

    async def acquire(self, priority: int, due: float) -> None:
        if self.busy < self.limit and not self._waiters:
            self.busy += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (-priority, due, next(self._seq), fut))
        self._pending += 1
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # granted and cancelled in the same step: hand it on
            else:
                self._pending -= 1  # (a granted one was counted out by release)
            raise

    def release(self) -> None:
        self.busy -= 1
        while self._waiters and self.busy < self.limit:
            *_, fut = heapq.heappop(self._waiters)
            if fut.done():
                continue
            self.busy += 1
            self._pending -= 1
            fut.set_result(None)

    def line_moved(self, steps: int) -> asyncio.Future[None] | None:
        """A future done once no run waits for a slot, or after at most ``steps`` loop
        steps (None: none waits now). The callers of one wait share one check per loop
        step and are woken together; each has its own future (cancelling it leaves the
        others waiting)."""
        if not self._pending:
            return None
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        if not self._movers:
            self._steps_left = steps
            loop.call_soon(self._check_line)
        self._movers.append(fut)
        return fut

    def _check_line(self) -> None:
        self._steps_left -= 1
        if self._pending and self._steps_left > 0 and any(not f.done() for f in self._movers):
            asyncio.get_running_loop().call_soon(self._check_line)
            return
        movers, self._movers = self._movers, []
        for fut in movers:
            if not fut.done():
                fut.set_result(None)
