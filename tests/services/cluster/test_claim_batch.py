"""Claims sent together (one ``append_many``) on PostgreSQL are decided one by one: a
claim another node won fails alone, a claim whose stream moved after its version was
read is retried alone, and the others of the batch stand."""

from __future__ import annotations

import time

import anyio
import pytest

from kernel import Kernel, Settings
from kernel.events import Event
from kernel.placement import Alone
from services.scheduler.claim import ClaimLost, Claims, claim
from services.scheduler.events import TaskStarted, TaskSucceeded, stream_of

pytestmark = pytest.mark.postgres


class Shared(Alone):
    """This node is one of several: claims carry expected versions."""

    shared = True


def settings(dsn: str, node: str) -> Settings:
    return Settings(store="postgres", dsn=dsn, node=node, reload=False)


def started(tid: str, run_id: str) -> list[Event]:
    return [TaskStarted(task=tid, run_id=run_id, scheduled_for=time.time(), attempt=1)]


async def test_a_lost_claim_and_a_moved_stream_fail_alone_in_a_batch(pg_dsn: str) -> None:
    async with Kernel(settings(pg_dsn, "a")) as a, Kernel(settings(pg_dsn, "b")) as b:
        a.placement = Shared()
        # b already started run k1 of task p.t1
        await claim(b, stream_of("p.t1"), started("p.t1", "r1"), "1" * 32, None)
        # while a reads the versions, b records an outcome on p.t2: a's version is stale
        read = a.store.stream_version
        once = [True]

        async def moved(stream: str) -> int:
            version = await read(stream)
            if stream == stream_of("p.t2") and once:
                once.clear()
                await b.append(
                    [TaskSucceeded(task="p.t2", run_id="old", attempt=1, duration_ms=1.0)],
                    stream=stream,
                )
            return version

        a.store.stream_version = moved  # type: ignore[method-assign]
        claims = Claims(a)
        futures = [
            claims.claim(stream_of(f"p.t{i}"), started(f"p.t{i}", f"r{i}"), str(i) * 32, None)
            for i in (1, 2, 3)
        ]
        with anyio.fail_after(60):
            with pytest.raises(ClaimLost):
                await futures[0]
            [won2] = [r for r in await futures[1] if r.meta.id == "2" * 32]
            [won3] = await futures[2]
        assert claims.batches == 1
        assert won2.version == 2 and won2.meta.node == "a"  # after b's outcome, retried
        assert won3.meta.node == "a"
        # (the example plugins load too: jobs.collect runs at each minute's start)
        starts = [r for r in await a.read(types=["TaskStarted"]) if r.stream.startswith("task-p.")]
        assert sorted((r.stream, r.meta.node) for r in starts) == [
            ("task-p.t1", "b"),
            ("task-p.t2", "a"),
            ("task-p.t3", "a"),
        ]
