"""Server-Sent Events: the live event stream and the live log stream.

Guarantee: a client that reconnects with ``Last-Event-ID`` (or ``?after=``) receives
every matching event after that position exactly once, in order — catch-up from the
log, then live, with no gap between the two — and a client that reads slowly or not
at all does not make the server's memory grow.

Mechanism: the stream is a pull loop over the store (``read(after=position,
limit=page)``, then ``wait`` for the next commit), never a queue fed by a
subscription: the generator reads the next page only when the previous one was sent,
and the ASGI server's ``send`` waits while the client's socket is full (flow control).
So a stalled client holds one page and a socket buffer, however far the log moves;
when it reads again it catches up from the log. The SSE ``id`` of an event is its log
position, of a log line its store id. An idle stream sends a heartbeat every
``heartbeat`` seconds so proxies keep it open and a dead client is noticed; the stream's
first frame and each heartbeat also carry an ``id`` without data (the position the
stream has passed, filtered events included), so a client that saw no event yet, or
only filtered ones, still resumes from where it was rather than from "now".
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from kernel.events import Recorded
from services.monitor.logstore import LogQuery, LogStore

if TYPE_CHECKING:
    from kernel.kernel import Kernel

__all__ = ["StreamState", "Streams", "event_matches"]

_ids = itertools.count(1)


@dataclass
class StreamState:
    """What one open stream has done (``GET /admin/stats`` and tests read it)."""

    kind: str
    position: int
    sent_events: int = 0
    sent_bytes: int = 0
    id: int = field(default_factory=lambda: next(_ids))


def event_matches(record: Recorded, plugin: str | None) -> bool:
    """Whether ``record`` is about ``plugin`` (its data names it, or its stream does)."""
    if plugin is None:
        return True
    data = record.data
    if data.get("plugin") == plugin or data.get("name") == plugin:
        return True
    stream = record.stream
    return stream in (f"plugin-{plugin}", f"sandbox-{plugin}") or stream.startswith(
        f"task-{plugin}."
    )


def _frame(event_id: int, event: str, data: bytes) -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event_id, event.encode(), data)


class Streams:
    """Open streams of this process, for introspection."""

    def __init__(self, heartbeat: float, page: int) -> None:
        self.heartbeat = heartbeat
        self.page = page
        self.open: dict[int, StreamState] = {}

    async def events(
        self,
        kernel: Kernel,
        after: int,
        types: Collection[str] | None,
        stream: str | None,
        plugin: str | None,
    ) -> AsyncIterator[bytes]:
        state = StreamState("events", after)
        self.open[state.id] = state
        store = kernel.store
        try:
            yield b"retry: 2000\nid: %d\n\n" % after
            position = after
            while True:
                last = await store.last_position()
                batch = await store.read(
                    after=position, types=types, stream=stream, limit=self.page
                )
                for record in batch:
                    position = record.position
                    if not event_matches(record, plugin):
                        continue
                    payload = orjson.dumps(record.to_dict())
                    frame = _frame(record.position, record.type, payload)
                    state.sent_events += 1
                    state.sent_bytes += len(frame)
                    yield frame
                    state.position = position
                if len(batch) < self.page:
                    # nothing else matched up to `last`: continue after it
                    position = max(position, last)
                    state.position = position
                    if await store.wait(position, self.heartbeat) <= position:
                        yield b"id: %d\n: heartbeat\n\n" % position
        finally:
            self.open.pop(state.id, None)

    async def logs(self, logs: LogStore, after: int, query: LogQuery) -> AsyncIterator[bytes]:
        state = StreamState("logs", after)
        self.open[state.id] = state
        try:
            yield b"retry: 2000\nid: %d\n\n" % after
            position = after
            while True:
                # stored (committed) before the query runs, so the query sees them all
                last = logs.last_id
                lines, more = await logs.query(query, limit=self.page, after=position)
                for line in lines:
                    position = line["id"]
                    frame = _frame(line["id"], "log", orjson.dumps(line))
                    state.sent_events += 1
                    state.sent_bytes += len(frame)
                    yield frame
                    state.position = position
                if not more:
                    # nothing else matched up to `last`: the next query starts after it
                    position = max(position, last)
                    state.position = position
                    if logs.last_id == last:
                        await logs.wait_for_lines(self.heartbeat)
                        if logs.last_id == last:
                            yield b"id: %d\n: heartbeat\n\n" % position
        finally:
            self.open.pop(state.id, None)

    def describe(self) -> list[dict[str, Any]]:
        return [
            {"id": s.id, "kind": s.kind, "position": s.position, "sent_events": s.sent_events}
            for s in self.open.values()
        ]
