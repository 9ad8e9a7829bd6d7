"""Shared stream-version reads: concurrent ``stream_version`` calls cost one query.

Guarantee: a call is answered by a query that started after the call was made (never by
an answer read before it), and a stream name the database refuses fails only the calls
that named it. Mechanism: calls queue a future per stream; one task drains the queue a
round at a time, reading every stream of the round in one query (a burst of claims reads
its streams in one trip, not one each). When that query is refused, each stream of the
round is read alone so the refusal lands on its own callers. The SQLite and PostgreSQL
stores both use it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from kernel.errors import StoreClosed

__all__ = ["VersionReads"]


class VersionReads:
    def __init__(
        self,
        read: Callable[[list[str]], Awaitable[dict[str, int]]],
        *,
        refused: tuple[type[Exception], ...],
        refusal: Callable[[str, Exception], Exception],
        closed: Callable[[], StoreClosed],
        name: str,
        newer: Callable[[str], int | None] = lambda stream: None,
    ) -> None:
        #: reads the versions of the given streams (absent: no event yet)
        self._read = read
        #: what a refused stream name raises, and the error its callers get
        self._refused = refused
        self._refusal = refusal
        self._closed = closed
        self._name = name
        #: a fresher count than the database's, when the store has one (its writer's)
        self._newer = newer
        self._wanted: dict[str, list[asyncio.Future[int]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def get(self, stream: str) -> int:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._wanted.setdefault(stream, []).append(future)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain(), name=self._name)
        return await future

    async def _drain(self) -> None:
        while self._wanted:
            wanted, self._wanted = self._wanted, {}
            try:
                found = await self._read_round(wanted)
            except BaseException as exc:
                error = exc if isinstance(exc, Exception) else self._closed()
                _fail(wanted, error)
                if not isinstance(exc, Exception):
                    raise
                continue
            for stream, futures in wanted.items():
                newer = self._newer(stream)
                version = newer if newer is not None else found.get(stream, 0)
                for f in futures:
                    if not f.done():
                        f.set_result(version)

    async def _read_round(self, wanted: dict[str, list[asyncio.Future[int]]]) -> dict[str, int]:
        try:
            return await self._read(list(wanted))
        except StoreClosed:
            raise
        except self._refused:
            pass
        found: dict[str, int] = {}
        for stream, futures in wanted.items():
            try:
                found.update(await self._read([stream]))
            except StoreClosed:
                raise
            except self._refused as e:
                _fail({stream: futures}, self._refusal(stream, e))
        return found

    async def close(self) -> None:
        """Stop reading; every call still waiting fails with the store's closed error."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])
        wanted, self._wanted = self._wanted, {}
        _fail(wanted, self._closed())


def _fail(wanted: dict[str, list[asyncio.Future[int]]], error: BaseException) -> None:
    for futures in wanted.values():
        for f in futures:
            if not f.done():
                f.set_exception(error)
