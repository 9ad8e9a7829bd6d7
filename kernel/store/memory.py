"""An in-memory event store: the same contract as SQLite, nothing durable. For tests."""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence

from kernel.errors import ConcurrencyError, StoreClosed
from kernel.events import NewEvent, Recorded
from kernel.store.base import ANY, Snapshot, describe_expected
from kernel.store.tail import Tail

__all__ = ["MemoryStore"]


class MemoryStore:
    """Keeps every event in a list; positions start at 1."""

    def __init__(self) -> None:
        self.location = "memory"
        self._events: list[Recorded] = []
        self._versions: dict[str, int] = {}
        self._ids: dict[str, Recorded] = {}
        self._checkpoints: dict[str, int] = {}
        self._snapshots: dict[str, Snapshot] = {}
        self._tail = Tail(size=1)
        self._open = False

    async def open(self) -> None:
        self._open = True
        self._tail.closed = False

    async def close(self) -> None:
        self._open = False
        self._tail.close()

    def _check_open(self) -> None:
        if not self._open:
            raise StoreClosed("the memory store is not open")

    async def append(
        self,
        events: Sequence[NewEvent],
        *,
        stream: str,
        expected_version: int | None = ANY,
    ) -> list[Recorded]:
        self._check_open()
        fresh: list[NewEvent] = []
        seen: set[str] = set()
        for e in events:
            if e.meta.id in self._ids or e.meta.id in seen:
                continue
            seen.add(e.meta.id)
            fresh.append(e)
        if events and not fresh:
            return [self._ids[e.meta.id] for e in events]
        current = self._versions.get(stream, 0)
        if expected_version is not ANY and expected_version != current:
            raise ConcurrencyError(stream, describe_expected(expected_version), current)
        now = time.time()
        out: list[Recorded] = []
        for e in fresh:
            current += 1
            r = Recorded.of(len(self._events) + 1, stream, current, e, now)
            self._events.append(r)
            self._ids[e.meta.id] = r
            out.append(r)
        self._versions[stream] = current
        self._tail.push(out)
        return out

    async def read(
        self,
        *,
        after: int = 0,
        types: Collection[str] | None = None,
        stream: str | None = None,
        limit: int | None = None,
    ) -> list[Recorded]:
        self._check_open()
        out: list[Recorded] = []
        for r in self._events[max(after, 0) :]:
            if types is not None and r.type not in types:
                continue
            if stream is not None and r.stream != stream:
                continue
            out.append(r)
            if limit is not None and len(out) >= limit:
                break
        return out

    async def last_position(self) -> int:
        self._check_open()
        return len(self._events)

    async def stream_version(self, stream: str) -> int:
        self._check_open()
        return self._versions.get(stream, 0)

    async def wait(self, after: int, timeout: float | None = None) -> int:
        self._check_open()
        return await self._tail.wait(after, timeout)

    async def load_checkpoint(self, name: str) -> int | None:
        return self._checkpoints.get(name)

    async def save_checkpoint(self, name: str, position: int) -> None:
        self._check_open()
        self._checkpoints[name] = position

    async def load_snapshot(self, name: str) -> Snapshot | None:
        return self._snapshots.get(name)

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        self._check_open()
        self._snapshots[snapshot.name] = snapshot
