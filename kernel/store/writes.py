"""The writes a group-commit writer queues (the SQLite and PostgreSQL writers share them).

Each carries the future its caller awaits; the writer resolves it once the transaction
holding the write is durable, or fails it with the reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kernel.events import NewEvent, Recorded

__all__ = ["Append", "Op", "Put", "Stop"]


@dataclass(eq=False, slots=True)
class Append:
    """Events for one stream, with the version the caller expects it at."""

    stream: str
    expected: int | None
    events: Sequence[NewEvent]
    future: asyncio.Future[list[Recorded]]
    #: ids already in the log (a retried append with explicit ids): answered from the log
    existing: list[str] | None = None


@dataclass(eq=False, slots=True)
class Put:
    """One more statement in the next batch (a checkpoint or snapshot upsert)."""

    sql: str
    params: tuple[Any, ...]
    future: asyncio.Future[None]


@dataclass(eq=False, slots=True)
class Stop:
    """Commit what is queued before it, then stop."""

    future: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


Op = Append | Put | Stop
