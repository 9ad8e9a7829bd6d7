"""The in-memory tail of a log: recent events and a commit signal.

Live subscribers wake on the signal and read new events from the tail without a round
trip to the database; a subscriber that fell further behind than the tail holds reads
from the store instead, so a slow subscriber costs no memory.

The tail keeps each event as its stored row (immutable bytes, not a decoded dict) and
decodes a fresh :class:`~kernel.events.Recorded` for every reader: what one subscriber
does to ``r.data`` is never seen by another, nor by the appender. It is bounded by bytes
(``max_bytes``, the payload and metadata sizes) as well as by count, so large events
cannot make it hold hundreds of megabytes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Collection, Sequence
from typing import Any

from kernel.events import Recorded

__all__ = ["Row", "Tail"]

#: ``(position, stream, version, type, schema, data, meta, timestamp)`` as stored.
Row = tuple[int, str, int, str, int, bytes, Any, float]


class Tail:
    """Keeps the last events (at most ``size`` of them and ``max_bytes`` of payload)
    and wakes waiters on each commit."""

    def __init__(self, size: int = 8192, max_bytes: int = 16 * 1024 * 1024) -> None:
        self._rows: deque[Row] = deque()
        self.size = size
        self.max_bytes = max_bytes
        self.bytes = 0
        self.last_position = 0
        self._signal: asyncio.Future[None] | None = None
        self.closed = False

    def reset(self, last_position: int) -> None:
        self._rows.clear()
        self.bytes = 0
        self.last_position = last_position

    def push(self, rows: Sequence[Row]) -> None:
        """Add freshly committed rows (in position order) and wake every waiter."""
        if rows:
            held = self._rows
            held.extend(rows)
            self.bytes += sum([len(row[5]) + len(row[6]) for row in rows])
            self.last_position = rows[-1][0]
            while held and (len(held) > self.size or self.bytes > self.max_bytes):
                old = held.popleft()
                self.bytes -= len(old[5]) + len(old[6])
        self._wake()

    def push_one(self, row: Row) -> None:
        """:meth:`push` for one row (a lone append's), without the list around it."""
        held = self._rows
        held.append(row)
        self.bytes += len(row[5]) + len(row[6])
        self.last_position = row[0]
        while len(held) > self.size or self.bytes > self.max_bytes:
            old = held.popleft()
            self.bytes -= len(old[5]) + len(old[6])
        signal = self._signal
        if signal is not None:
            self._signal = None
            if not signal.done():
                signal.set_result(None)

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
        rows = self._rows
        if not rows:
            return [] if after >= self.last_position else None
        first = rows[0][0]
        if after < first - 1:
            return None
        if after >= self.last_position:
            return []
        start = after - first + 1
        out: list[Row] = []
        if limit == 0:
            return []
        for i in range(start, len(rows)):
            row = rows[i]
            if types is not None and row[3] not in types:
                continue
            if stream is not None and row[1] != stream:
                continue
            out.append(row)
            if limit is not None and len(out) >= limit:
                break
        return Recorded.from_rows(out)

    async def wait(self, after: int, timeout: float | None) -> int:
        if self.last_position > after or self.closed:
            return self.last_position
        if self._signal is None:
            self._signal = asyncio.get_running_loop().create_future()
        signal = self._signal
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation
        # that arrives as the signal fires, and a subscriber being stopped waited on
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.shield(signal)
        return self.last_position
