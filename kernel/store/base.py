"""The event store interface every backend implements (memory, SQLite, later PostgreSQL).

A store is an append-only log of :class:`~kernel.events.Recorded` events with a global,
gapless position, plus two small tables the kernel needs beside it: subscription
checkpoints and projection snapshots. ``tests/kernel/store/test_contract.py`` is the
suite every backend must pass.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, runtime_checkable

from kernel.errors import StoreError
from kernel.events import NewEvent, Recorded

__all__ = [
    "ANY",
    "NO_STREAM",
    "EventStore",
    "Snapshot",
    "StreamWrite",
    "WriteResult",
    "check_limit",
    "check_types",
    "check_write",
    "describe_expected",
]

#: ``expected_version`` that accepts any current version of the stream.
ANY: Final = None
#: ``expected_version`` that requires the stream to have no event yet.
NO_STREAM: Final = 0


def check_limit(limit: int | None) -> None:
    """Refuse a negative read ``limit`` (0 reads nothing; None reads everything)."""
    if limit is not None and limit < 0:
        raise StoreError(f"a read's limit must be 0 or more (or None for no limit), not {limit}")


def check_types(types: Collection[str] | None) -> frozenset[str] | None:
    """``types`` as a set for lookups; a single type name is refused, since a string is a
    collection of its characters and would silently match nothing."""
    if isinstance(types, (str, bytes)):
        raise StoreError(
            f"a read's types must be a collection of type names, not the string {types!r} "
            f"(write types=[{types!r}])"
        )
    if types is None or isinstance(types, frozenset):
        return types
    return frozenset(types)


def check_write(
    location: str, stream: object, events: object, expected: object = None
) -> Sequence[NewEvent]:
    """``events`` for ``stream`` as a list or tuple of :class:`NewEvent`, or a
    :class:`StoreError` naming the culprit. A write is checked before it joins a batch:
    there, a stream name that is not a string or an item that is not an event would fail
    every other write of the batch (a group-commit writer handles them all in one go)
    or stop the writer; an iterator of events has no length the writer can count."""
    if not isinstance(stream, str):
        raise StoreError(
            f"{location}: a stream name must be a string, not "
            f"{type(stream).__name__} {_short(stream)}"
        )
    if expected is not None and type(expected) is not int:
        # "1" or 1.0 was compared with the version and refused as a conflict that named
        # the very version the stream was at (True passed as 1)
        raise StoreError(
            f"{location}: stream {stream!r}: expected_version must be a whole number "
            f"(or ANY), not {type(expected).__name__} {_short(expected)}"
        )
    if type(events) is not list and type(events) is not tuple:
        if isinstance(events, (str, bytes, NewEvent)) or not isinstance(events, Iterable):
            raise StoreError(
                f"{location}: stream {stream!r}: the events must be a sequence of "
                f"NewEvent, not {type(events).__name__} {_short(events)}"
            )
        events = list(events)
    for i, e in enumerate(events):
        if not isinstance(e, NewEvent):
            raise StoreError(
                f"{location}: stream {stream!r}: event {i} is not a NewEvent but "
                f"{type(e).__name__} {_short(e)}, nothing of this write was appended"
            )
    return events


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def describe_expected(expected: int | None) -> str:
    if expected is None:
        return "any"
    if expected == NO_STREAM:
        return "0 (no stream)"
    return str(expected)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A projection's saved state at ``position`` (``schema`` is the projection's)."""

    name: str
    position: int
    schema: int
    state: bytes


@dataclass(frozen=True, slots=True)
class StreamWrite:
    """One stream's part of :meth:`EventStore.append_many`: ``events`` for ``stream``,
    checked against ``expected_version`` exactly as :meth:`EventStore.append` checks."""

    stream: str
    events: Sequence[NewEvent]
    expected_version: int | None = ANY


#: What :meth:`EventStore.append_many` answers for each write: its records, or why it
#: was refused (a ConcurrencyError, a payload that is not JSON...).
WriteResult = list[Recorded] | StoreError


@runtime_checkable
class EventStore(Protocol):
    """An append-only event log."""

    #: Where the log lives, for messages (a file path, a DSN without password, "memory").
    location: str

    async def open(self) -> None:
        """Open (and create if needed) the log; raise StoreLocked/StoreCorrupt clearly."""
        ...

    async def close(self) -> None:
        """Flush pending appends, then release every resource. Idempotent."""
        ...

    async def append(
        self,
        events: Sequence[NewEvent],
        *,
        stream: str,
        expected_version: int | None = ANY,
    ) -> list[Recorded]:
        """Append ``events`` to ``stream`` atomically; return once they are durable.

        ``expected_version`` is ``ANY`` (None), ``NO_STREAM`` (0) or the exact current
        version; a mismatch raises ConcurrencyError and appends nothing. Events whose
        ``meta.id`` is already in the log are not stored again; when none is left, the
        stored records are returned and the version is not checked.
        """
        ...

    async def append_many(self, writes: Sequence[StreamWrite]) -> list[WriteResult]:
        """Append each of ``writes`` to its own stream, all in one durable commit where
        the backend group-commits (one writer batch, one fsync); return once they are.

        Each write is decided alone, as :meth:`append` decides it: its expected version,
        its ids already in the log. A write refused for its own content (a version
        conflict, a payload that is not JSON, a bad stream name) gets its
        ``StoreError`` in its place of the answer, in the order of ``writes``, and the
        others are stored all the same. A failure of the store itself (closed, the
        disk full) is raised, or answered for every write.
        """
        ...

    async def read(
        self,
        *,
        after: int = 0,
        types: Collection[str] | None = None,
        stream: str | None = None,
        limit: int | None = None,
    ) -> list[Recorded]:
        """Events with position > ``after``, in position order, optionally filtered."""
        ...

    async def last_position(self) -> int:
        """The position of the newest event (0 for an empty log)."""
        ...

    async def stream_version(self, stream: str) -> int:
        """The version of the newest event of ``stream`` (0 if it has none)."""
        ...

    async def wait(self, after: int, timeout: float | None = None) -> int:
        """Wait until the log holds an event past ``after``; return the last position.

        Returns the current last position at once when it is already past ``after``,
        or after ``timeout`` seconds whatever it is.
        """
        ...

    def health(self) -> tuple[bool, dict[str, Any]]:
        """``(healthy, details)`` for ``/health``: unhealthy, with the reason in
        ``details["error"]``, while appends fail (the disk is full, the writer stopped)
        or the store is closed. Quick, no I/O, never raises."""
        ...

    async def load_checkpoint(self, name: str) -> int | None:
        """The saved position of the subscription ``name``, or None."""
        ...

    async def save_checkpoint(self, name: str, position: int) -> None:
        """Durably save the position of the subscription ``name``."""
        ...

    async def load_snapshot(self, name: str) -> Snapshot | None:
        """The newest snapshot saved under ``name``, or None."""
        ...

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        """Save (replace) the snapshot of ``snapshot.name``."""
        ...
