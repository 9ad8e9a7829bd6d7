"""An in-memory event store: the same contract as SQLite, nothing durable. For tests.

Events are kept as stored rows and decoded afresh for every reader, as the SQLite store
does: a reader that mutates ``r.data`` changes nothing anyone else sees.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence

from kernel.errors import ConcurrencyError, StoreClosed, StoreError
from kernel.events import NewEvent, Recorded
from kernel.store.base import (
    ANY,
    Snapshot,
    StreamWrite,
    WriteResult,
    check_limit,
    check_types,
    check_write,
    describe_expected,
)
from kernel.store.tail import Row, Tail

__all__ = ["MemoryStore"]


class MemoryStore:
    """Keeps every event in a list; positions start at 1."""

    def __init__(self) -> None:
        self.location = "memory"
        self._events: list[Row] = []
        self._versions: dict[str, int] = {}
        self._ids: dict[str, Row] = {}
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

    def health(self) -> tuple[bool, dict[str, object]]:
        return self._open, {"location": self.location}

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
        events = check_write(self.location, stream, events, expected_version)
        fresh: list[NewEvent] = []
        seen: set[str] = set()
        for e in events:
            if e.meta.id in self._ids or e.meta.id in seen:
                continue
            seen.add(e.meta.id)
            fresh.append(e)
        if events and not fresh:
            return Recorded.from_rows(self._ids[e.meta.id] for e in events)
        current = self._versions.get(stream, 0)
        if expected_version is not ANY and expected_version != current:
            raise ConcurrencyError(stream, describe_expected(expected_version), current)
        now = time.time()
        out: list[Recorded] = []
        rows: list[Row] = []
        position = len(self._events)
        for e in fresh:
            current += 1
            position += 1
            try:
                out.append(Recorded.of(position, stream, current, e, now))
            except Exception as exc:
                raise StoreError(f"memory: event refused, not JSON: {exc}") from exc
            rows.append(
                (position, stream, current, e.type, e.schema, e.data, e.meta.to_json(), now)
            )
        for e, row in zip(fresh, rows, strict=True):
            self._events.append(row)
            self._ids[e.meta.id] = row
        self._versions[stream] = current
        self._tail.push(rows)
        return out

    async def append_many(self, writes: Sequence[StreamWrite]) -> list[WriteResult]:
        self._check_open()
        out: list[WriteResult] = []
        for w in writes:
            try:
                if not isinstance(w, StreamWrite):
                    raise StoreError(
                        f"memory: append_many takes StreamWrite values, not {type(w).__name__}"
                    )
                out.append(
                    await self.append(
                        w.events, stream=w.stream, expected_version=w.expected_version
                    )
                )
            except StoreClosed:
                raise
            except StoreError as exc:  # this write's own refusal: the others go on
                out.append(exc)
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
        check_limit(limit)
        types = check_types(types)
        out: list[Row] = []
        if limit == 0:
            return []
        for row in self._events[max(after, 0) :]:
            if types is not None and row[3] not in types:
                continue
            if stream is not None and row[1] != stream:
                continue
            out.append(row)
            if limit is not None and len(out) >= limit:
                break
        return Recorded.from_rows(out)

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
