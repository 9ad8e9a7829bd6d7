"""The in-memory tail of a log: recent events and a commit signal.

Live subscribers wake on the signal and read new events from the tail without a round
trip to the database; a subscriber that fell further behind than the tail holds reads
from the store instead, so a slow subscriber costs no memory.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Collection, Iterable

from kernel.events import Recorded

__all__ = ["Tail"]


class Tail:
    """Keeps the last ``size`` recorded events and wakes waiters on each commit."""

    def __init__(self, size: int = 8192) -> None:
        self._events: deque[Recorded] = deque(maxlen=size)
        self.last_position = 0
        self._signal: asyncio.Future[None] | None = None
        self.closed = False

    def reset(self, last_position: int) -> None:
        self._events.clear()
        self.last_position = last_position

    def push(self, records: Iterable[Recorded]) -> None:
        """Add freshly committed events (in position order) and wake every waiter."""
        for r in records:
            self._events.append(r)
            self.last_position = r.position
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        signal, self._signal = self._signal, None
        if signal is not None and not signal.done():
            signal.set_result(None)

    def read(
        self,
        after: int,
        types: Collection[str] | None,
        stream: str | None,
        limit: int | None,
    ) -> list[Recorded] | None:
        """Events past ``after`` from memory, or None when the tail does not reach back."""
        events = self._events
        if not events:
            return [] if after >= self.last_position else None
        first = events[0].position
        if after < first - 1:
            return None
        if after >= self.last_position:
            return []
        start = after - first + 1
        out: list[Recorded] = []
        for i in range(start, len(events)):
            r = events[i]
            if types is not None and r.type not in types:
                continue
            if stream is not None and r.stream != stream:
                continue
            out.append(r)
            if limit is not None and len(out) >= limit:
                break
        return out

    async def wait(self, after: int, timeout: float | None) -> int:
        if self.last_position > after or self.closed:
            return self.last_position
        if self._signal is None:
            self._signal = asyncio.get_running_loop().create_future()
        signal = self._signal
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(signal), timeout)
        return self.last_position
