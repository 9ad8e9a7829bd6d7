"""The writes a group-commit writer queues (the SQLite and PostgreSQL writers share them).

Each carries the future its caller awaits; the writer resolves it once the transaction
holding the write is durable, or fails it with the reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kernel.errors import StoreClosed, StoreError
from kernel.events import NewEvent, Recorded
from kernel.store.base import WriteResult

__all__ = ["Append", "Op", "Put", "Stop", "settle"]


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


async def settle(
    answers: list[WriteResult | asyncio.Future[list[Recorded]]],
) -> list[WriteResult]:
    """The answers of an ``append_many`` whose writes were queued as one ``Append``
    each (contiguous, so the writer takes them into one batch): each write's records or
    its own ``StoreError``, in order. A closed store is raised, not answered.

    If the caller stops waiting, the writes still commit (as a lone append's would);
    their answers are then read and dropped, never left as unretrieved errors.
    """
    futures = [a for a in answers if isinstance(a, asyncio.Future)]
    try:
        # one wake-up per batch, not one callback per write: the writer answers a
        # batch's writes in order, in one step, so once the last one is done (the
        # writes left over by a split batch are waited for the same way) all are
        pending = [f for f in futures if not f.done()]
        while pending:
            await asyncio.wait((pending[-1],))
            pending = [f for f in pending if not f.done()]
    except asyncio.CancelledError:
        for f in futures:
            f.add_done_callback(_drop)
        raise
    out: list[WriteResult] = []
    for a in answers:
        if not isinstance(a, asyncio.Future):
            out.append(a)
            continue
        exc = a.exception()
        if exc is None:
            out.append(a.result())
        elif isinstance(exc, StoreError) and not isinstance(exc, StoreClosed):
            out.append(exc)
        else:
            raise exc
    return out


def _drop(future: asyncio.Future[list[Recorded]]) -> None:
    if not future.cancelled():
        future.exception()
