"""Event store backends behind one protocol (see ``base.py``)."""

from __future__ import annotations

from kernel.store.base import ANY, NO_STREAM, EventStore, Snapshot, StreamWrite, WriteResult
from kernel.store.memory import MemoryStore
from kernel.store.sqlite import SQLiteStore

__all__ = [
    "ANY",
    "NO_STREAM",
    "EventStore",
    "MemoryStore",
    "SQLiteStore",
    "Snapshot",
    "StreamWrite",
    "WriteResult",
]
