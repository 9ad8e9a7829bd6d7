"""Waiting for a busy state to end, with a bound.

Guarantee: :meth:`Idle.wait` returns once the state it watches no longer holds (its
owner calls :meth:`Idle.notify` when the state may have ended), or after its timeout;
a waiter that times out or is cancelled is taken back, so a state that never ends does
not pile up one future per wait.

Mechanism: one future per waiter, woken together by :meth:`Idle.notify` when the state
is over. Used by the claims' batches (``claim.Claims.idle``: no claim queued or being
written) and the start gate (``timers.StartGate.idle``: no run waits for an instant).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["Idle"]


class Idle:
    def __init__(self, busy: Callable[[], bool]) -> None:
        self._busy = busy
        self._waiters: list[asyncio.Future[None]] = []

    def __len__(self) -> int:
        """How many wait now."""
        return len(self._waiters)

    async def wait(self, timeout: float) -> None:
        """Return once ``busy()`` is false (or after ``timeout`` seconds)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._busy() and (left := deadline - loop.time()) > 0:
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append(fut)
            try:
                await asyncio.wait([fut], timeout=left)
            finally:
                if not fut.done():  # timed out (or cancelled): not kept for ever
                    fut.cancel()
                    self._waiters.remove(fut)

    def notify(self) -> None:
        """Wake the waiters if the state is over."""
        if self._busy() or not self._waiters:
            return
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
